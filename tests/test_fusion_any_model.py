"""Any PyTorch model, as Flower users write them: levels are found by tracing what forward runs, residual
connections make streams the linear variant fits too, and what cannot be fused correctly is refused by
name."""

from __future__ import annotations

import copy
import operator
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fedfuse import FusionConfig, LevelSpec, describe_levels, fuse
from fedfuse.fusion import UntraceableModelError
from fedfuse.fusion.clustering import _fill_empty_groups
from fedfuse.fusion.fitting import numerical_rank
from fedfuse.fusion.tracing import runnable, shared_code, subgraph, trace
from tests.permutation import permuted_copy
from tests.test_fusion_recovers_functions import assert_same_function, trained_statistics
from tests.user_models import (
    TCN,
    AttentionPooling,
    AttentionResidual,
    BagOfWords,
    BatchSizeBranch,
    BidirectionalGRU,
    BidirectionalLSTMState,
    CalledTwice,
    CharLSTM,
    ConcatenatedOutput,
    ConvLayerNorm,
    DataDependent,
    DenseNetBC,
    FeatureNet,
    FunctionalConvNet,
    GroupNormResNet,
    InceptionNet,
    IncomeClassifier,
    KimCNN,
    LayerNormMLP,
    MaxOfBranches,
    MaxOverTime,
    MnistExampleNet,
    NormalisingNet,
    PreActResNet,
    PReLUNet,
    QuickstartNet,
    Regressor,
    Reordered,
    SamePaddingCNN,
    ShapeBranches,
    SmallResNet,
    SplitBranches,
    SquaredFeatures,
    SqueezeExcite,
    StateLSTM,
    StatisticsPooling,
    SummedOutput,
    TabularEmbeddings,
    TextCNN,
    TiedNet,
    TinyMobileNet,
    TransformerClassifier,
    Transposed,
    TutorialNet,
    UpsamplingNet,
    ValueBranch,
)

EXACT = FusionConfig(ridge=0.0)
SEEDED = torch.Generator().manual_seed(0)  # for inputs drawn at collection, in the module's order


@pytest.fixture(scope="module")
def quickstart() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The quickstart Net, a permuted copy, and calibration images: 1,500, so that even the ReLU units that
    random images rarely switch on are spanned and the closed form is exact."""
    torch.manual_seed(0)
    model = QuickstartNet().eval()
    calibration = torch.randn(1500, 3, 32, 32)
    return model, permuted_copy(model, seed=1, example=calibration), calibration


def test_fusing_permuted_copies_of_flowers_quickstart_net_recovers_its_function(quickstart) -> None:
    model, permuted, calibration = quickstart
    result = fuse([model, permuted], calibration, EXACT)
    assert [level.name for level in result.report.levels] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert result.report.levels[2].fan_in == 16 * 5 * 5 + 1  # fc1 reads the flattened conv2 channels
    inputs = torch.randn(100, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_a_layer_wider_than_the_calibration_set_is_fitted_in_the_span_of_its_rows() -> None:
    """PyTorch's MNIST example on 200 images: ``fc1`` reads 9,216 inputs. Its fit is solved in the span of
    the 200 rows (a 200 × 200 system; the 9,216 × 9,216 normal equations took 20 s and 2 GB), and the
    permuted copy still fuses back into the function, off the calibration set too."""
    torch.manual_seed(0)
    model = MnistExampleNet().eval()
    calibration = torch.randn(200, 1, 28, 28)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    fc1 = result.report.levels[2]
    assert (fc1.name, fc1.fan_in, fc1.rows, fc1.rank) == ("fc1", 9217, 200, 200)
    assert fc1.seconds["solve"] < 5.0
    inputs = torch.randn(50, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_a_forward_that_loops_over_its_inputs_shape_is_traced_and_fused() -> None:
    """PyTorch's tutorial ``Net`` counts its flattened features in a Python loop over ``x.size()[1:]``,
    which plain symbolic tracing cannot follow; traced with the shapes of the calibration inputs, its
    permuted copy fuses back into its function, on batches of any size."""
    torch.manual_seed(0)
    model = TutorialNet().eval()
    calibration = torch.randn(600, 1, 32, 32)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert [level.name for level in result.report.levels] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    for batch in (1, 37):
        inputs = torch.randn(batch, 1, 32, 32, generator=torch.Generator().manual_seed(batch))
        assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_a_branch_on_the_number_of_input_axes_is_taken_as_the_calibration_inputs_take_it() -> None:
    torch.manual_seed(0)
    model = ShapeBranches().eval()
    calibration = torch.randn(300, 1, 8, 8)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(20, 1, 8, 8), tolerance=1e-4)


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (BatchSizeBranch, "computes something else than the model on a batch of 1"),
        (
            ValueBranch,
            r"symbolically traced variables cannot be used as inputs to control flow at user_models\.py:\d+ "
            r"`if x\.mean\(\)\.item\(\) > 0:`",  # the line of the user's code where tracing failed
        ),
    ],
    ids=["batch-size", "tensor-value"],
)
def test_control_flow_on_the_batch_size_or_on_values_is_refused_not_fused_for_one_batch(
    model: type[nn.Module], reason: str
) -> None:
    with pytest.raises(UntraceableModelError, match=reason):
        fuse([model(), model()], torch.randn(64, 8))


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_a_mobilenet_with_depthwise_convolutions_fuses_back_into_its_function(variant: str) -> None:
    """Each depthwise convolution is a level of its own, in its input's stream (its channel c reads
    channel c alone, so both sides share one grouping), fitted channel by channel."""
    torch.manual_seed(0)
    model = TinyMobileNet().eval()
    calibration = torch.randn(800, 1, 16, 16)
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(ridge=0.0, variant=variant, epochs=2),
    )
    levels = {level.name: level for level in result.report.levels}
    assert levels["blocks.1.depthwise.0"].kind == "depthwise2d"
    assert levels["blocks.1.depthwise.0"].fan_in == 3 * 3 + 1  # one channel's taps, and the folded bias
    assert levels["blocks.1.depthwise.0"].space == levels["blocks.1.expand.0"].space
    inputs = torch.randn(50, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_a_depthwise_convolution_on_the_models_input_keeps_its_channels_by_index() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4))
    plan = describe_levels(model, torch.randn(8, 3, 8, 8))
    assert plan.spaces[plan.levels[0].space].fixed
    assert "depthwise convolution '0' reads the model's input channels" in str(plan)


def test_a_grouped_convolution_that_is_not_depthwise_is_refused_by_name() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 1), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    with pytest.raises(ValueError, match=r"convolution '1' has groups=2; only groups=1 and depthwise"):
        fuse([model, copy.deepcopy(model)], torch.randn(32, 1, 8, 8))


def test_a_model_with_depthwise_convolutions_keeps_its_width() -> None:
    with pytest.raises(
        ValueError, match="TinyMobileNet has blocks, embeddings, depthwise convolutions, norms or PReLUs"
    ):
        fuse([TinyMobileNet(), TinyMobileNet()], torch.randn(64, 1, 16, 16), FusionConfig(width_multiplier=2))


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_channels_concatenated_from_several_layers_keep_each_ones_grouping_and_fuse_back(
    variant: str,
) -> None:
    """Inception's branches, DenseNet's growing input (the model's input among it) and a mean-and-max
    head: every space in a concatenation keeps its own grouping, and a layer reading it maps its inputs
    through each part's."""
    torch.manual_seed(0)
    model = InceptionNet().eval()
    calibration = torch.randn(800, 1, 8, 8)
    plan = describe_levels(model, calibration[:8])
    dense = next(level for level in plan.levels if level.name == "dense")
    assert dense.concatenated == ((None, 1), ("stem", 6), ("branch1", 4), ("branch3.0", 5))
    assert next(level for level in plan.levels if level.name == "head").concatenated == (("dense", 7),) * 2
    assert "input+stem+branch1+branch3.0" in str(plan)
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(ridge=0.0, variant=variant, epochs=2),
    )
    inputs = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_an_output_concatenated_from_several_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="the model's output concatenates the outputs of several layers"):
        fuse([ConcatenatedOutput(), ConcatenatedOutput()], torch.randn(32, 8))


def test_optional_forward_arguments_are_traced_with_their_defaults_as_fusion_calls_the_model() -> None:
    torch.manual_seed(0)
    model = FeatureNet().eval()
    calibration = torch.randn(400, 10)
    plan = describe_levels(model, calibration[:8])
    assert [level.name for level in plan.levels] == ["fc1", "fc2"]
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(50, 10), tolerance=1e-4)


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_an_embedding_of_token_ids_is_the_aligned_average_and_fuses_back_for_unseen_tokens_too(
    variant: str,
) -> None:
    """The calibration texts use token ids 0-39 of 50: the fused table is the aligned average of the
    parents' (exact for every token), so the function comes back for the ten ids never seen too."""
    torch.manual_seed(0)
    model = BagOfWords().eval()
    calibration = torch.randint(0, 40, (600, 7))
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(ridge=0.0, variant=variant, epochs=2),
    )
    embedding = result.report.levels[0]
    assert (embedding.kind, embedding.neurons, embedding.fan_in, embedding.fit_r2) == (
        "embedding",
        12,
        50,
        1.0,
    )
    unseen = torch.randint(40, 50, (100, 7), generator=torch.Generator().manual_seed(0))
    assert_same_function(result.model, model, unseen, tolerance=1e-4)


def test_an_embedding_of_positions_not_of_the_inputs_ids_is_no_level_of_its_own() -> None:
    """``pos(torch.arange(T))`` looks up the same rows for every sample: a parameter added to the stream,
    like a position embedding tensor, not a level whose neurons can be grouped by their values."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens, self.positions = nn.Embedding(30, 8), nn.Embedding(16, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            where = torch.arange(ids.shape[1], device=ids.device)
            return self.head(torch.tanh(self.tokens(ids) + self.positions(where)).mean(1))

    with pytest.raises(ValueError, match=r"'positions' \(Embedding\) looks up ids that are not the input's"):
        fuse([Positions(), Positions()], torch.randint(0, 30, (64, 6)))


def test_kims_sentence_cnn_is_fused_in_closed_form_embedding_convolutions_and_concatenation() -> None:
    torch.manual_seed(0)
    model = KimCNN().eval()
    calibration = torch.randint(0, 60, (700, 12))
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    kinds = [level.kind for level in result.report.levels]
    assert kinds == ["embedding", "conv1d", "conv1d", "conv1d", "linear"]
    assert_same_function(result.model, model, torch.randint(0, 60, (50, 12)), tolerance=1e-4)


def test_conductance_is_refused_for_token_ids_it_cannot_interpolate() -> None:
    tokens = torch.randint(0, 50, (64, 7))
    with pytest.raises(ValueError, match=r"importance='conductance' .* torch.int64 inputs \(token ids\)"):
        fuse([BagOfWords(), BagOfWords()], tokens, FusionConfig(importance="conductance"))


def test_a_squeeze_and_excitation_gate_shares_its_channels_grouping_and_fuses_back() -> None:
    """The gate's output multiplies the channels it was computed from: one stream, grouped on both
    points. The gate's values barely vary from sample to sample (they read means), so its point is
    mostly its mean; each point is balanced by its energy, not its variance, or that near-constant
    point outweighs the channels' own (grouping by its means alone, k-means mismatched the copies)."""
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    calibration = torch.randn(800, 1, 8, 8)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    levels = {level.name: level for level in result.report.levels}
    assert levels["fc2"].space == levels["conv2"].space
    assert levels["conv2"].grouping_cost < 1e-6
    assert_same_function(result.model, model, torch.randn(50, 1, 8, 8), tolerance=1e-4)


def test_an_nn_sequential_subclass_is_fused_as_its_forward_runs_not_as_registered() -> None:
    torch.manual_seed(0)
    model = Reordered().eval()
    calibration = torch.randn(400, 10)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert [level.name for level in result.report.levels] == ["0", "2", "1"]
    assert_same_function(result.model, model, torch.randn(100, 10), tolerance=1e-4)


def test_a_torchvision_style_resnet_with_projection_shortcuts_is_recovered_by_the_linear_variant() -> None:
    """Each convolution is a level fitted in closed form; the stream's levels share its grouping and the
    last term of each residual sum is fitted to the stream's target minus the fused other terms."""
    torch.manual_seed(0)
    calibration = torch.rand(300, 1, 12, 12)
    model = trained_statistics(SmallResNet(), calibration)
    parents = [model] + [permuted_copy(model, seed=s, example=calibration) for s in (1, 2)]
    result = fuse(parents, calibration, EXACT)
    plan = describe_levels(model, calibration[:4])
    assert plan.spaces["conv1"].levels == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert plan.spaces["layer2.0.conv2"].levels == (
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer2.1.conv2",
    )
    completing = {level.name for level in plan.levels if level.residual}
    assert completing == {"layer1.0.conv2", "layer1.1.conv2", "layer2.0.downsample.0", "layer2.1.conv2"}
    assert all(level.closed_form for level in plan.levels)
    assert_same_function(result.model, model, torch.rand(100, 1, 12, 12), tolerance=1e-3)


def test_declared_linear_levels_are_fitted_in_closed_form_even_when_the_model_cannot_be_traced() -> None:
    torch.manual_seed(0)
    model = DataDependent().eval()
    calibration = torch.randn(300, 8)
    with pytest.raises(UntraceableModelError, match=r"DataDependent cannot be traced .* fusion_levels\(\)"):
        fuse([model, copy.deepcopy(model)], calibration)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    permuted = copy.deepcopy(model)
    with torch.no_grad():
        permuted.fc.weight.copy_(model.fc.weight[order])
        permuted.fc.bias.copy_(model.fc.bias[order])
        permuted.head.weight.copy_(model.head.weight[:, order])
    result = fuse([model, permuted], calibration, EXACT, levels=["fc", "head"])
    assert [level.kind for level in result.report.levels] == ["linear", "linear"]
    assert_same_function(result.model, model, torch.randn(100, 8), tolerance=1e-4)


class _Recurrent(nn.Module):
    """An LSTM that returns its outputs alone: what a declared level must return."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class _SequenceClassifier(nn.Module):
    def __init__(self, wrapped: bool) -> None:
        super().__init__()
        self.rnn = _Recurrent() if wrapped else nn.LSTM(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        return self.fc((out if isinstance(out, torch.Tensor) else out[0])[:, -1, :])


def test_a_recurrent_layer_is_declared_through_a_wrapper_returning_its_outputs() -> None:
    """An LSTM returns ``(outputs, state)``: declared bare, it is refused with how to wrap it; wrapped,
    the gradient variant fits it as a block."""
    x = torch.randn(120, 5, 8)
    bare = [_SequenceClassifier(wrapped=False).eval() for _ in range(2)]
    with pytest.raises(
        TypeError, match=r"declared level 'rnn' returns tuple, not one tensor; .* wrap the module"
    ):
        fuse(bare, x, FusionConfig(variant="gradient"), levels=["rnn", "fc"])
    torch.manual_seed(0)
    wrapped = [_SequenceClassifier(wrapped=True).eval() for _ in range(2)]
    result = fuse(wrapped, x, FusionConfig(variant="gradient", epochs=2), levels=["rnn", "fc"])
    assert [(level.name, level.kind) for level in result.report.levels] == [
        ("rnn", "block"),
        ("fc", "linear"),
    ]
    assert result.report.levels[0].fit_r2 > 0.5  # trained toward the group targets, not left at a start


@pytest.mark.parametrize(
    ("model", "recurrent", "units"),
    [(CharLSTM, "lstm", 32), (StateLSTM, "lstm", 16), (BidirectionalGRU, "gru", 32)],
    ids=["outputs", "final-state", "bidirectional"],
)
def test_a_traced_recurrent_layer_is_a_block_whose_hidden_units_are_grouped_and_trained(
    model: type[nn.Module], recurrent: str, units: int
) -> None:
    """``out, _ = self.lstm(x)``, ``_, (h, _) = self.lstm(x)`` then ``h[-1]``, a bidirectional GRU: what
    the model reads of the layer holds hidden units on its last axis, so the layer is a block with
    neurons, traced without a declaration: the default (auto) variant trains it and solves the rest, the
    linear variant names it. A state ``[layers, N, H]`` is never a cut between blocks: its samples are on
    axis 1."""
    tokens = torch.randint(0, 30, (200, 12), generator=torch.Generator().manual_seed(0))
    parents = [model().eval() for _ in range(2)]
    with pytest.raises(
        ValueError, match=rf"only the gradient variant fits: '{recurrent}': module '{recurrent}'"
    ):
        fuse(parents, tokens, FusionConfig(variant="linear"))
    levels = fuse(parents, tokens).report.levels
    block = next(level for level in levels if level.name == recurrent)
    assert (block.kind, block.neurons, block.grouping) == ("block", units, "kmeans")
    assert block.fit_r2 > 0.5
    assert all(level.epochs is None for level in levels if level.kind != "block")


@pytest.mark.parametrize(
    ("model", "block", "inputs", "grouping"),
    [
        (TransformerClassifier, "encoder", torch.randint(0, 30, (200, 12), generator=SEEDED), "kmeans"),
        (AttentionResidual, "attention", torch.randn(200, 5, 6, generator=SEEDED), "stream"),
    ],
    ids=["transformer-encoder", "multihead-attention"],
)
def test_torchs_attention_and_transformer_layers_are_blocks_whose_model_width_is_grouped_and_trained(
    model: type[nn.Module], block: str, inputs: torch.Tensor, grouping: str
) -> None:
    """``nn.TransformerEncoder`` (and its layers, decoders) and ``nn.MultiheadAttention`` (``a, _ =
    attention(h, h, h)``) output their model width on the last axis: blocks with neurons, found by
    tracing, trained by the default variant and named by the linear one. The attention's output is added
    to its input, so its neurons are in the projection's stream, grouped with it."""
    torch.manual_seed(0)
    parents = [model().eval() for _ in range(2)]
    with pytest.raises(ValueError, match=rf"only the gradient variant fits: '{block}'"):
        fuse(parents, inputs, FusionConfig(variant="linear"))
    levels = {level.name: level for level in fuse(parents, inputs).report.levels}
    assert (levels[block].kind, levels[block].neurons, levels[block].grouping) == ("block", 16, grouping)
    assert levels[block].fit_r2 > 0.5


def test_a_layer_norm_over_channels_and_positions_is_a_block_that_keeps_its_inputs_channels() -> None:
    """``nn.LayerNorm([C, H, W])``: one parameter per channel and position, so no closed form, but channel
    c stays at c, so the block it makes (with the convolution before it) has neurons that can be told
    apart: the 8 x 36 values the flatten after it lays out, which the layer after it reads. Before, the
    block's output was unknown and the model refused."""
    torch.manual_seed(0)
    parents = [ConvLayerNorm().eval() for _ in range(2)]
    calibration = torch.randn(300, 1, 8, 8)
    block, head = describe_levels(parents[0], calibration[:8]).levels
    assert (block.kind, block.parameters) == (
        "block",
        ("conv.weight", "conv.bias", "norm.weight", "norm.bias"),
    )
    assert (block.width, head.source, head.kind) == (8 * 36, block.space, "linear")
    levels = fuse(parents, calibration).report.levels
    assert levels[0].grouping == "kmeans" and levels[0].fit_r2 > 0.5


def test_a_convolution_registered_twice_and_called_once_is_one_level_fitted_under_both_names() -> None:
    """locuslab's TCN registers each convolution as ``conv1`` and inside ``net``: one module, one call, so
    no tie to keep. A permuted copy fuses back into its function, and both names hold the fitted weights."""
    torch.manual_seed(0)
    model = TCN().eval()
    calibration = torch.randn(700, 3, 40)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert [level.name for level in result.report.levels][:3] == [
        "network.0.conv1",
        "network.0.conv2",
        "network.0.downsample",
    ]
    assert_same_function(result.model, model, torch.randn(50, 3, 40), tolerance=1e-4)
    block = result.model.network[0]
    assert block.net[0] is block.conv1 and result.model.state_dict().keys() == model.state_dict().keys()


def test_a_batch_norm_without_running_statistics_is_a_block_normalising_each_batch_as_the_parents_do() -> (
    None
):
    """``BatchNorm1d(track_running_stats=False)`` normalises by each batch's statistics even in eval mode:
    no affine map to fold, so a block, trained on calibration batches like the parents' (fusion never runs
    a parent on a batch of one, which such a norm refuses)."""
    torch.manual_seed(0)
    parents = [
        nn.Sequential(
            nn.Linear(20, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.ReLU(), nn.Linear(32, 4)
        )
        for _ in range(3)
    ]
    levels = fuse([parent.eval() for parent in parents], torch.randn(300, 20)).report.levels
    assert [(level.name, level.kind) for level in levels] == [
        ("0", "linear"),
        ("1", "block"),
        ("3", "linear"),
    ]
    assert levels[1].fit_r2 > 0.9


def test_one_neuron_broadcast_over_the_channels_it_weights_joins_none_of_them() -> None:
    """Attention pooling's ``w * h``: the score ``w`` (one neuron, ``[N, T, 1]``) scales every channel of
    ``h`` and is no channel of theirs. Joining its space to ``h``'s crashed the grouping (16 neurons
    against 1); it stays a space of one neuron, and a permuted copy fuses back into the function."""
    torch.manual_seed(0)
    model = AttentionPooling().eval()
    calibration = torch.randn(700, 7, 6)
    plan = describe_levels(model, calibration[:8])
    proj, score, _ = plan.levels
    assert (score.width, score.space != proj.space, plan.spaces[score.space].fixed) == (1, True, True)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(50, 7, 6), tolerance=1e-4)


@pytest.mark.parametrize(
    ("model", "inputs", "block", "width"),
    [
        (BidirectionalLSTMState, torch.randint(0, 30, (300, 9), generator=SEEDED), "lstm", 20),
        (SplitBranches, torch.randn(300, 3, 12, 12, generator=SEEDED), "[left..right]", 16),
    ],
    ids=["both-directions-final-states", "split-branches"],
)
def test_channels_concatenated_from_spaces_only_a_block_made_are_that_blocks_neurons(
    model: type[nn.Module], inputs: torch.Tensor, block: str, width: int
) -> None:
    """``torch.cat((h[-2], h[-1]), dim=1)`` of a bidirectional LSTM, or two convolutions on the halves of
    a ``torch.split``: the concatenated channels come from spaces no level outside the block makes, so
    they are the block's own neurons, grouped, and what the next layer reads. Before, the next layer read
    spaces that no longer existed (``KeyError: '#3'``), and the split block took the width axis for its
    channels."""
    torch.manual_seed(0)
    plan = describe_levels(model(), inputs[:8])
    level = next(level for level in plan.levels if level.name == block)
    assert (level.kind, level.width, plan.levels[-1].source) == ("block", width, level.space)
    levels = {level.name: level for level in fuse([model().eval() for _ in range(3)], inputs).report.levels}
    assert (levels[block].neurons, levels[block].grouping) == (width, "kmeans")
    parent = model().eval()
    result = fuse([parent, copy.deepcopy(parent)], torch.cat([inputs, inputs]), EXACT)
    assert_same_function(result.model, parent, inputs[:50], tolerance=1e-4)


def test_the_indices_of_a_max_that_nothing_reads_do_not_fix_the_channels_before_it() -> None:
    """``x, _ = torch.max(x, dim=2)`` records the indices too; unread, they are dropped from the graph, so
    ``conv2`` is grouped (it was matched by index, with a warning) and a permuted copy fuses back."""
    torch.manual_seed(0)
    model = MaxOverTime().eval()
    calibration = torch.randn(700, 20, 6)
    plan = describe_levels(model, calibration[:8])
    assert [space.fixed for space in plan.spaces.values()] == [False, False, True]  # the classes keep theirs
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(50, 20, 6), tolerance=1e-4)


def _tabular(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(count)
    categories = [torch.randint(0, cardinality, (count, 1), generator=generator) for cardinality in (5, 7, 3)]
    return torch.cat([*categories, torch.randn(count, 4, generator=generator)], 1).float()


@pytest.mark.parametrize(
    ("model", "inputs"),
    [(DenseNetBC, torch.randn(700, 1, 8, 8, generator=SEEDED)), (TabularEmbeddings, _tabular(700))],
    ids=["densenet-bc", "tabular-embeddings"],
)
def test_a_blocks_channels_concatenated_with_channels_it_passes_through_keep_their_index(
    model: type[nn.Module], inputs: torch.Tensor
) -> None:
    """A BatchNorm that follows no layer (DenseNet-BC's pre-activation of the running concatenation, a
    tabular model's numeric columns) makes a block, whose own channels are concatenated with channels it
    passes through (the block's input, the model's input): no grouping of the block can move those, so
    the concatenation keeps its index, said by name. Before, the next layer read spaces no level made
    (``KeyError: '#1'``)."""
    torch.manual_seed(0)
    plan = describe_levels(model(), inputs[:8])
    assert "a block's output concatenates its own channels with channels it passes through" in str(plan)
    parents = [model().eval() for _ in range(2)]
    with pytest.warns(UserWarning, match="matched by index, not grouped"):
        fuse(parents, inputs[:300])
    parent = model().eval()
    result = fuse([parent, copy.deepcopy(parent)], inputs, EXACT)
    assert_same_function(result.model, parent, inputs[:50], tolerance=1e-4)


def test_a_submodule_named_by_a_python_keyword_is_refused_by_name_not_with_a_syntax_error() -> None:
    """A personalised head kept as ``nn.ModuleDict({"global": ..., "local": ...})``: torch.fx writes
    ``self.heads.global(...)``, which is no Python; the refusal says so and names the line."""

    class PersonalHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = nn.Linear(8, 16)
            self.heads = nn.ModuleDict({"global": nn.Linear(16, 3), "local": nn.Linear(16, 3)})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.heads["global"](torch.relu(self.base(x)))

    with pytest.raises(UntraceableModelError, match=r"self\.heads\.global\(.*a Python keyword"):
        fuse([PersonalHeads(), PersonalHeads()], torch.randn(32, 8))


def test_padding_the_positions_keeps_the_channels_and_padding_the_channels_fixes_them() -> None:
    """Reflection and replication padding of an image's positions keep each channel where it is, like
    pooling (a permuted copy fuses back); a 1-d padding of ``[N, C]`` pads the channels themselves, which
    then keep their index."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 3), nn.ReflectionPad2d(1), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReplicationPad2d(1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    ).eval()  # fmt: skip
    calibration = torch.randn(800, 1, 8, 8)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(50, 1, 8, 8), tolerance=1e-4)
    padded_features = nn.Sequential(nn.Linear(5, 6), nn.ConstantPad1d(1, 0.0), nn.ReLU(), nn.Linear(8, 3))
    assert "'1' (ConstantPad1d): fusion has no rule" in str(
        describe_levels(padded_features, torch.randn(4, 5))
    )


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_a_batch_norm_that_follows_a_sum_is_fitted_channel_by_channel_and_fuses_back(variant: str) -> None:
    """A pre-activation ResNet's BatchNorms follow sums, not layers. In eval mode each is an affine map of
    its channels: a level of its own in its stream, its running statistics set to the fused model's
    input's and its scale and shift fitted (or, for the gradient variant, started from the members'
    mix, made comparable through the affine maps they compute). Before, each made a block. Permuted
    copies with running statistics far from their inputs' fuse back into their function."""
    torch.manual_seed(0)
    model = PreActResNet()
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5), norm.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(norm.weight, 0.5, 1.5), nn.init.uniform_(norm.bias, -0.3, 0.3)
    model.eval()
    calibration = torch.randn(1200, 1, 8, 8)
    levels = describe_levels(model, calibration[:8]).levels
    assert [level.kind for level in levels if "bn" in level.name] == ["per_channel"] * 3
    result = fuse(
        [model, permuted_copy(model, seed=1, example=calibration)],
        calibration,
        FusionConfig(ridge=0.0, variant=variant, epochs=2),
    )
    assert_same_function(result.model, model, torch.randn(50, 1, 8, 8), tolerance=1e-4)


def test_tied_weights_are_refused_with_both_names() -> None:
    with pytest.raises(ValueError, match=r"'fc2.weight' is the same tensor as 'fc1.weight' \(tied weights\)"):
        fuse([TiedNet(), TiedNet()], torch.randn(32, 8))


def test_a_module_with_parameters_called_twice_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match=r"module 'fc' \(Linear\) holds parameters and is called 2 times"):
        fuse([CalledTwice(), CalledTwice()], torch.randn(32, 8))


def test_each_level_is_fitted_on_the_fused_models_own_previous_levels() -> None:
    """The head's weights are the ridge solution on the *fused* first level's outputs: recomputed here
    from scratch, and far from the solution on a parent's own first-level outputs."""
    torch.manual_seed(0)
    parents = [nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(2)]
    x = torch.randn(500, 10)
    ridge = 1e-3
    fused = fuse(parents, x, FusionConfig(ridge=ridge, prior="zero")).model  # plain ridge: easy to redo

    def ridge_solution(inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.double()
        design = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
        gram = design.T @ design
        gram.diagonal()[:-1] += ridge * (inputs.T @ inputs).diagonal().mean()
        targets = torch.stack([parent(x) for parent in parents]).mean(0).double()  # classes by index
        return torch.linalg.solve(gram, design.T @ targets).T.float()

    with torch.no_grad():
        own = ridge_solution(fused[1](fused[0](x)))
        parents_inputs = ridge_solution(parents[0][1](parents[0][0](x)))
        written = torch.cat([fused[2].weight, fused[2].bias[:, None]], dim=1)
    torch.testing.assert_close(written, own, rtol=1e-3, atol=1e-4)
    assert (written - parents_inputs).abs().max() > 0.1


def test_the_gradient_variant_trains_every_level_from_its_start() -> None:
    """Unrelated parents leave a gap between a start and the targets that only training closes: from a
    fresh random start the fused function ends near the parents' mean, and from the aligned start more
    epochs fit the head better than one."""
    torch.manual_seed(0)
    parents = [nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)).eval() for _ in range(2)]
    x = torch.randn(500, 10)
    with torch.no_grad():
        target = torch.stack([parent(x) for parent in parents]).mean(0)
    fresh = fuse(parents, x, FusionConfig(variant="gradient", level_init="fresh", class_weights="uniform"))
    untrained = copy.deepcopy(parents[0])
    for layer in (untrained[0], untrained[2]):
        layer.reset_parameters()
    with torch.no_grad():
        fused_error = (fresh.model(x) - target).square().mean()
        random_error = (untrained(x) - target).square().mean()
    assert fused_error < 0.05 * random_error
    short, long = (
        fuse(parents, x, FusionConfig(variant="gradient", epochs=epochs, patience=epochs)).report.levels
        for epochs in (1, 30)
    )
    # The aligned start reproduces the first level's targets exactly (every parent reads the same input);
    # the head's start does not, and training closes part of that gap.
    assert short[0].fit_r2 == pytest.approx(1.0) and long[0].fit_r2 == pytest.approx(1.0)
    assert long[1].fit_r2 > short[1].fit_r2 + 0.01


def test_empty_groups_are_given_the_farthest_member_of_a_crowded_group() -> None:
    """k-means can leave a group empty when neurons coincide (dead units: identical zeros); every group
    then takes the member of a group of two or more that lies farthest (weighted) from its group's mean."""
    points = np.array([[0.0], [0.0], [0.0], [1.0], [5.0]])
    weights = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    labels = np.array([0, 0, 0, 1, 1])  # group 2 empty; group 1's mean is 3, group 0's is 0
    filled = _fill_empty_groups(points, weights, labels, groups=3)
    assert sorted(set(filled.tolist())) == [0, 1, 2]
    assert filled.tolist() == [0, 0, 0, 1, 2]  # point 4 (distance 4 from its mean) moves
    heavy_far_point = _fill_empty_groups(points, np.array([1.0, 1.0, 1.0, 1.0, 9.0]), labels, groups=3)
    assert heavy_far_point.tolist() == [0, 0, 0, 2, 1]  # the mean moves to 4.6: now point 3 is farthest
    assert _fill_empty_groups(points, weights, np.array([0, 0, 0, 0, 0]), groups=3).tolist().count(0) == 3


def test_one_model_fused_to_half_its_width_is_fitted_to_it_not_left_at_random() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    x = torch.randn(500, 10)
    result = fuse([model], x, FusionConfig(width_multiplier=0.5))
    assert result.model[0].out_features == 16 and len(result.report.levels) == 2
    with torch.no_grad():
        expected = model(x)
        error = (result.model(x) - expected).square().mean() / expected.var()
    assert error < 0.2


def test_constant_calibration_inputs_warn_with_the_level_and_the_rank() -> None:
    parents = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    with pytest.warns(
        UserWarning, match=r"level '0': the 64 calibration rows span only 1 of the 7 .* \(rank 1\)"
    ):
        result = fuse(parents, torch.ones(64, 6))
    assert result.report.levels[0].rank == 1 and result.report.levels[0].ill_posed


@pytest.mark.parametrize(
    ("rows", "columns", "rank"),
    [(40, 100, 40), (500, 30, 30), (500, 30, 12)],  # fewer rows than inputs; full; low rank
)
def test_the_numerical_rank_counts_the_directions_the_rows_span(rows: int, columns: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(rows + columns + rank)
    x = torch.randn(rows, rank, dtype=torch.float64, generator=generator) @ torch.randn(
        rank, columns, dtype=torch.float64, generator=generator
    )
    x[:, 0] = 0.0  # one input never non-zero
    x[:, 1] *= 1e3  # scales do not matter
    expected_rank = int(torch.linalg.matrix_rank(x))
    assert numerical_rank(x.T @ x) == (expected_rank, columns - 1)


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (torch.randn(32, 7), r"cannot run on the calibration inputs \(shape \[8, 7\], torch.float32\)"),
        (
            torch.randint(0, 5, (32, 6)),
            r"cannot run on the calibration inputs \(shape \[8, 6\], torch.int64\)",
        ),
        (torch.full((32, 6), float("nan")), "calibration batch 0 holds NaN or Inf inputs"),
        (
            (torch.randn(32, 6), torch.full((32,), 3)),
            r"labels must be class indices in \[0, 3\).*from 3 to 3",
        ),
        ((torch.randn(32, 6), torch.full((32,), -1)), r"labels must be class indices in \[0, 3\)"),
    ],
    ids=["feature-shape", "integer-dtype", "nan", "label-too-large", "label-negative"],
)
def test_calibration_problems_are_named_before_any_work(calibration: object, message: str) -> None:
    parents = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match=message):
        fuse(parents, calibration, FusionConfig(importance="gradient_x_activation"))


def test_a_model_on_the_meta_device_is_refused() -> None:
    with torch.device("meta"):
        ghost = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"parent 1's '0.weight' is on the meta device"):
        fuse([nn.Sequential(nn.Linear(6, 3)), ghost], torch.randn(8, 6))


def test_describe_levels_shows_each_levels_kind_width_stream_and_variants() -> None:
    text = str(describe_levels(QuickstartNet(), torch.randn(2, 3, 32, 32)))
    assert "QuickstartNet: 5 levels (traced)" in text
    assert "fc1    linear  120    fc1      conv2 x25  linear, gradient" in text
    assert "fc3    linear  10     classes  fc2        linear, gradient" in text
    resnet = describe_levels(SmallResNet(), torch.rand(2, 1, 12, 12))
    assert "stream conv1" in str(resnet) and "(+1 residual)" in str(resnet)


@pytest.mark.parametrize("pooling", ["values", "index", "amax", "adaptive_max_pool1d"])
def test_a_max_over_time_written_any_way_keeps_the_convolutions_channels_to_be_matched(pooling: str) -> None:
    """``x.max(dim=2).values`` once lost the channels silently: the head then read the model's "input", and
    the convolution's channels were matched by index, not grouped."""
    torch.manual_seed(0)
    model = TextCNN(pooling).eval()
    calibration = torch.randn(600, 6, 10)
    assert "fc     linear  4      classes  conv" in str(describe_levels(model, calibration[:2]))
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert [level.grouping for level in result.report.levels] == ["kmeans", "index"]
    assert_same_function(result.model, model, torch.randn(100, 6, 10), tolerance=1e-4)


def test_branches_joined_by_an_element_wise_maximum_share_one_grouping_and_are_recovered() -> None:
    torch.manual_seed(0)
    model = MaxOfBranches().eval()
    calibration = torch.randn(400, 8)
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert [level.grouping for level in result.report.levels] == ["kmeans", "stream", "index"]
    assert_same_function(result.model, model, torch.randn(100, 8), tolerance=1e-4)


def test_neurons_an_operation_without_a_rule_reads_are_matched_by_index_and_fusion_says_why() -> None:
    """Matching by index is correct for any model (it averages neuron j with neuron j), so it is the
    fallback; but it is poor for parents from different starts, so it is named, never silent."""
    calibration = torch.randn(16, 8)
    plan = describe_levels(Transposed(), calibration)
    assert plan.spaces["fc"].fixed
    assert "fc: matched by index, not grouped: the attribute .T of neurons" in str(plan)
    with pytest.warns(UserWarning, match=r"level 'fc': its neurons are matched by index, not grouped \(the"):
        result = fuse([Transposed(), Transposed()], calibration)
    assert result.report.levels[0].grouping == "index"


@pytest.mark.parametrize(
    ("model", "features"), [(IncomeClassifier, 14), (Regressor, 8)], ids=["sigmoid", "squeezed"]
)
def test_a_model_with_one_output_fuses_back_whether_it_returns_n_by_1_or_n_values(
    model: type[nn.Module], features: int
) -> None:
    """Flower's tabular example returns one sigmoid score per sample, [N, 1]; a regressor often squeezes
    its one output neuron to [N]. Either way that neuron is the output, matched by index."""
    torch.manual_seed(0)
    parent = model().eval()
    calibration = torch.randn(600, features)
    result = fuse([parent, permuted_copy(parent, seed=1, example=calibration)], calibration, EXACT)
    assert result.report.levels[-1].grouping == "index"
    assert_same_function(result.model, parent, torch.randn(100, features), tolerance=1e-4)


def test_labels_cannot_index_a_single_output_so_they_are_set_aside_with_a_warning() -> None:
    torch.manual_seed(0)
    parents = [IncomeClassifier().eval() for _ in range(2)]
    inputs = torch.randn(300, 14)
    labels = (inputs[:, 0] > 0).long()
    with pytest.warns(UserWarning, match="IncomeClassifier has one output, which no class label indexes"):
        labelled = fuse(parents, (inputs, labels)).model
    unlabelled = fuse(parents, inputs).model
    for key, value in labelled.state_dict().items():
        assert torch.equal(value, unlabelled.state_dict()[key]), key


def test_an_output_that_mixes_the_last_layers_neurons_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="SummedOutput's output is no layer's neurons as they are"):
        fuse([SummedOutput(), SummedOutput()], torch.randn(64, 8))


def _with_affine_parameters_drawn(model: nn.Module) -> nn.Module:
    """Norms and PReLUs start at ones and zeros; trained ones are not."""
    with torch.no_grad():
        for name, value in model.named_parameters():
            if "gn" in name or "ln" in name or "act" in name:
                value.uniform_(0.5, 1.5) if name.endswith("weight") else value.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize("variant", ["linear", "gradient"])
@pytest.mark.parametrize(
    ("model", "shape", "per_channel"),
    [
        (GroupNormResNet, (3, 8, 8), ["gn", "gn1", "gn2"]),
        (LayerNormMLP, (20,), ["ln1", "ln2"]),
        (PReLUNet, (1, 8, 8), ["act1", "act2"]),
    ],
    ids=["groupnorm-resnet", "layernorm-mlp", "prelu"],
)
def test_norms_and_prelus_are_levels_of_per_channel_parameters_and_fuse_back(
    model: type[nn.Module], shape: tuple[int, ...], per_channel: list[str], variant: str
) -> None:
    """A GroupNorm, LayerNorm or PReLU keeps its input's channels and is affine in its per-channel
    parameters: a level of its own in its input's stream, fitted channel by channel in closed form
    (shared slopes as one problem). A GroupNorm's copies are permuted group by group, as it allows."""
    torch.manual_seed(0)
    parent = _with_affine_parameters_drawn(model()).eval()
    calibration = torch.randn(800, *shape)
    permuted = permuted_copy(parent, seed=1, example=calibration)
    result = fuse([parent, permuted], calibration, replace(EXACT, variant=variant))
    kinds = {level.name: level.kind for level in result.report.levels}
    assert [name for name, kind in kinds.items() if kind == "per_channel"] == per_channel
    assert "block" not in kinds.values()
    assert_same_function(result.model, parent, torch.randn(100, *shape), tolerance=1e-4)


def test_a_per_channel_modules_features_rebuild_its_output_for_any_parameters() -> None:
    """The closed form rests on the module's output being offset + Σ parameter · feature."""
    from fedfuse.fusion.per_channel import parameter_features

    inputs = torch.randn(5, 8, 3, 3)
    for module in (nn.GroupNorm(2, 8), nn.PReLU(8), nn.InstanceNorm2d(8, affine=True)):
        offset, features = parameter_features(module, inputs, axis=1)
        with torch.no_grad():
            for value in module.parameters():
                value.normal_()
            expected = module(inputs).movedim(1, -1).reshape(-1, 8)
        parameters = torch.stack([value.expand(8) for value in module.parameters()], dim=-1)
        assert torch.allclose(offset + (features * parameters).sum(-1), expected, atol=1e-5)


def test_buffers_and_literal_tensors_of_the_forward_are_computed_for_each_model_not_baked_in() -> None:
    """fx keeps ``self.mean.view(...)`` and ``torch.tensor([0.5])`` as attributes of the model it traced,
    which the parents and the fused model lack: fusion failed with an AttributeError. The buffer is now
    read from each model and the literal made again by the graph."""
    torch.manual_seed(0)
    model = NormalisingNet().eval()
    calibration = torch.randn(400, 1, 8, 8)
    plan = describe_levels(model, calibration[:8])
    assert {node.target for node in plan.graph.nodes if node.op == "get_attr"} == {"mean", "std"}
    result = fuse([model, permuted_copy(model, seed=1, example=calibration)], calibration, EXACT)
    assert_same_function(result.model, model, torch.randn(50, 1, 8, 8), tolerance=1e-4)


def test_a_layer_without_a_closed_form_is_a_block_whose_output_channels_are_its_out_channels() -> None:
    """A transposed convolution (or a Conv3d) says how many channels it outputs, on axis 1: its block's
    neurons are told apart and grouped, so the gradient variant fuses it; the linear variant names it."""
    calibration = torch.randn(200, 1, 8, 8)
    parents = [UpsamplingNet().eval() for _ in range(2)]
    with pytest.raises(
        ValueError, match=r"only the gradient variant fits: 'up': module 'up' \(ConvTranspose2d\)"
    ):
        fuse(parents, calibration, FusionConfig(variant="linear"))
    result = fuse(parents, calibration, FusionConfig(variant="gradient", epochs=2))
    assert [(level.name, level.kind, level.neurons) for level in result.report.levels] == [
        ("conv", "conv2d", 8),
        ("up", "block", 8),
        ("fc", "linear", 3),
    ]
    assert result.report.levels[1].grouping == "kmeans"


def test_a_transformer_is_cut_into_blocks_that_only_the_gradient_variant_fits() -> None:
    from fedfuse.models import build_model

    vit = build_model("vit", in_channels=1, image_size=8, num_classes=10, seed=0, dim=16, depth=1).eval()
    images = torch.rand(64, 1, 8, 8)
    with pytest.raises(ValueError, match=r"only the gradient variant fits.*cls_token"):
        fuse([vit, copy.deepcopy(vit)], images, FusionConfig(variant="linear"))
    result = fuse([vit, copy.deepcopy(vit)], images, FusionConfig(variant="gradient", epochs=2))
    # The head's LayerNorm, alone between the stream and the classifier, is a level of its own.
    assert {level.kind for level in result.report.levels} == {"conv2d", "block", "per_channel", "linear"}
    # By default (auto) the blocks are trained and the rest solved: no level trained that need not be.
    auto = fuse([vit, copy.deepcopy(vit)], images, FusionConfig(epochs=2)).report.levels
    assert all((level.epochs is None) == (level.kind != "block") for level in auto)


def test_levels_declared_by_argument_override_tracing(quickstart) -> None:
    model, permuted, calibration = quickstart
    declared = [LevelSpec("conv1"), "conv2", "fc1", "fc2", "fc3"]
    result = fuse([model, permuted], calibration, EXACT, levels=declared)
    assert not describe_levels(model, calibration[:2], levels=declared).traced
    inputs = torch.randn(50, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # not the tests' order
    assert_same_function(result.model, model, inputs, tolerance=1e-4)


def test_values_read_in_one_run_are_not_overwritten_by_later_in_place_operations() -> None:
    # torchvision's BasicBlock ends in `out += identity; return self.relu(out)` with ReLU(inplace=True):
    # read together with a later place, the block's sum must still hold its negative entries.
    torch.manual_seed(0)
    model = SmallResNet().eval()
    graph = trace(model)
    sums = [node.name for node in graph.graph.nodes if node.target is operator.add]
    later = [node.name for node in graph.graph.nodes][-2]
    alone = runnable(model, subgraph(graph.graph, ("x",), (sums[0],)))
    together = runnable(model, subgraph(graph.graph, ("x",), (sums[0], later)))
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        expected, (read, _) = alone(x), together(x)
    assert bool((expected < 0).any())
    assert torch.equal(read, expected)


def test_a_piece_compiled_once_computes_with_the_model_it_is_given() -> None:
    # The Reader compiles each piece once for all parents: it must read each parent's own parameters.
    torch.manual_seed(0)
    first, second = SmallResNet().eval(), SmallResNet().eval()
    graph = trace(first).graph
    output = [node.name for node in graph.nodes][-2]
    piece = shared_code(first, subgraph(graph, ("x",), (output,)))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(piece(second, x), second(x))
        assert torch.equal(piece(first, x), first(x))
        assert not torch.equal(piece(second, x), first(x))


def _weight_normed(model: nn.Module) -> nn.Module:
    """``model`` with its first and last layers weight-normed (torch's parametrization: the same function)."""
    for name in ("fc1", "head"):
        setattr(model, name, nn.utils.parametrizations.weight_norm(getattr(model, name)))
    return model


@pytest.mark.parametrize("variant", ["linear", "gradient"])
def test_weight_normed_layers_are_fused_as_the_layers_they_compute_and_stay_weight_normed(
    variant: str,
) -> None:
    """A weight-normed layer's weight is computed at every access: the fused weight is stored through the
    parametrization (its magnitude and direction), not copied into that throwaway tensor, and the
    parents keep theirs (a deep copy shares its parametrized class with the model it copies)."""
    torch.manual_seed(0)
    model = LayerNormMLP().eval()
    calibration = torch.randn(600, 20)
    permuted = permuted_copy(model, seed=1, example=calibration)
    parents = [_weight_normed(model), _weight_normed(permuted)]
    result = fuse(parents, calibration, FusionConfig(ridge=0.0, variant=variant, epochs=2))
    assert nn.utils.parametrize.is_parametrized(result.model.fc1, "weight")
    assert result.model.state_dict().keys() == model.state_dict().keys()
    assert not torch.equal(result.model.fc1.weight, permuted.fc1.weight)  # written, not parent 0's
    assert_same_function(result.model, model, torch.randn(50, 20), tolerance=1e-4)
    assert parents[0].fc1.weight.shape == (32, 20)  # still parametrized: its class kept its property


def test_a_parametrized_layer_keeps_its_width() -> None:
    with pytest.raises(ValueError, match=r"width_multiplier=2 would change the shape of 'fc1.weight'"):
        fuse(
            [_weight_normed(LayerNormMLP()) for _ in range(2)],
            torch.randn(64, 20),
            FusionConfig(width_multiplier=2),
        )


def test_a_spectral_norm_which_cannot_hold_a_fused_weight_is_refused_before_any_work() -> None:
    models = [
        nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 3))
    ]
    models.append(copy.deepcopy(models[0]))
    with pytest.raises(ValueError, match=r"module '0': its parametrization of 'weight' \(_SpectralNorm\)"):
        fuse(models, torch.randn(64, 8))


def _hook_weight_normed(model: nn.Module) -> nn.Module:
    """``model`` with its first and last layers weight-normed by the older, hook-based API (locuslab's TCN
    uses it): ``weight`` is recomputed from ``weight_g`` and ``weight_v`` before every forward."""
    for name in ("fc1", "head"):
        setattr(model, name, nn.utils.weight_norm(getattr(model, name)))
    return model


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
def test_hook_weight_normed_layers_are_fused_as_the_layers_they_compute_and_keep_their_keys() -> None:
    """Written into ``weight``, a fused weight was overwritten by the hook at the next forward: the fused
    layer silently stayed parent 0's. It is stored as ``weight_g`` and ``weight_v`` instead."""
    torch.manual_seed(0)
    model = LayerNormMLP().eval()
    calibration = torch.randn(600, 20)
    permuted = permuted_copy(model, seed=1, example=calibration)
    parents = [_hook_weight_normed(model), _hook_weight_normed(permuted)]
    result = fuse(parents, calibration, FusionConfig(ridge=0.0))
    assert result.model.state_dict().keys() == model.state_dict().keys()
    assert {"fc1.weight_g", "fc1.weight_v"} <= result.model.state_dict().keys()
    assert_same_function(result.model, model, torch.randn(50, 20), tolerance=1e-4)
    reloaded = _hook_weight_normed(LayerNormMLP()).eval()
    reloaded.load_state_dict(result.model.state_dict())  # what a Flower client receives computes the same
    assert_same_function(reloaded, model, torch.randn(50, 20), tolerance=1e-4)


@pytest.mark.filterwarnings("ignore:.*weight_norm is deprecated")
def test_a_hook_weight_normed_model_fuses_straight_after_training() -> None:
    """Its computed weight then hangs in the autograd graph, which ``copy.deepcopy`` refuses."""
    calibration = torch.randn(64, 20)
    parents = []
    for seed in range(2):
        torch.manual_seed(seed)
        parent = _hook_weight_normed(LayerNormMLP())
        parent(calibration).square().mean().backward()  # a training step's forward, with gradients
        parents.append(parent)
    fused = fuse(parents, calibration).model
    assert fused.state_dict().keys() == parents[0].state_dict().keys()


@pytest.mark.filterwarnings("ignore:.*spectral_norm")
def test_a_hook_based_spectral_norm_is_refused_by_name() -> None:
    models = [nn.Sequential(nn.utils.spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 3))]
    models.append(copy.deepcopy(models[0]))
    with pytest.raises(ValueError, match=r"module '0' has a spectral norm \(torch.nn.utils.spectral_norm\)"):
        fuse(models, torch.randn(64, 8))


def test_layers_called_as_functions_with_the_models_own_weights_make_spaces_of_their_output_channels() -> (
    None
):
    """``F.conv2d(x, self.weight, self.bias)``: its output channels are neurons to group (axis 1, not the
    image's last axis, which was silently matched by index), fitted as a block by gradient descent."""
    torch.manual_seed(0)
    model = FunctionalConvNet().eval()
    calibration = torch.randn(256, 1, 8, 8)
    plan = describe_levels(model, calibration[:8])
    conv = plan.levels[0]
    assert (conv.kind, conv.width, conv.axis) == ("block", 12, 1)
    assert not plan.spaces[conv.space].fixed
    permuted = copy.deepcopy(model)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        permuted.conv_weight.copy_(model.conv_weight[order])
        permuted.conv_bias.copy_(model.conv_bias[order])
        permuted.fc_weight.copy_(model.fc_weight.reshape(4, 12, 4)[:, order].reshape(4, 48))
    assert_same_function(permuted, model, calibration, tolerance=1e-6)
    result = fuse([model, permuted], calibration, FusionConfig(output_target="logits", epochs=30))
    assert_same_function(result.model, model, torch.randn(64, 1, 8, 8), tolerance=1e-3)


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (SquaredFeatures, (16,)),
        (lambda: SquaredFeatures(method=True), (16,)),
        (StatisticsPooling, (4, 20)),
        (SamePaddingCNN, (1, 8, 8)),
    ],
    ids=["h ** 2", "h.pow(2)", "std and logsumexp pooling", "F.pad"],
)
def test_powers_statistics_pooling_and_functional_padding_keep_the_channels_and_fuse_back(
    build, shape
) -> None:
    """They were matched by index, with a warning ("no rule"): a power with a constant exponent is
    element-wise, std, var and logsumexp reduce over positions like a mean, F.pad pads trailing axes."""
    torch.manual_seed(0)
    model = build().eval()
    calibration = torch.randn(400, *shape)
    plan = describe_levels(model, calibration[:8])
    assert all(not space.fixed for space in plan.spaces.values() if not space.classes)
    permuted = permuted_copy(model, seed=1, example=calibration)
    result = fuse([model, permuted], calibration, FusionConfig(output_target="logits", ridge=0.0))
    assert_same_function(result.model, model, torch.randn(64, *shape), tolerance=1e-4)
