"""The one-shot non-IID harness: FedFuse against FedAvg, the project's main job.

``python -m simulations.one_shot`` loads a data set, keeps a class-balanced calibration set and an
evaluation set on the server, partitions the rest over K clients (non-IID), trains the clients once
through Flower's simulation runtime with real ClientApps, and scores on the same client models: each
client alone, one-shot FedAvg, FedFuse (every variant and importance method asked for), the clients'
logit ensemble, and optionally multi-round FedAvg and central training. It prints a table per setting
and over seeds, and writes JSON, CSV and plots.

Modules, in the order a run uses them: `cli` (options → settings), `setting` (one run, its seeds),
`sweep` (runs settings), `flower_training` with `client_app`, `collector` and `progress_grid` (the
Flower run), `methods` (the comparison), `summary` (over seeds), `report` (printed tables),
`outputs` (JSON, CSV), `plots`.
"""
