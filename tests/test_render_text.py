"""The text helpers every human-readable output shares: literal names, shortened names, plurals."""

from __future__ import annotations

import pytest

from bncheck.render.text import literal, plural, shorten_middle, shorten_names
from tests.named_models import TORCH_NAMES


@pytest.mark.parametrize(
    "raw,shown",
    [
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("row\nbreak", "row\\nbreak"),
        ("tab\there", "tab\\there"),
        ("cr\r", "cr\\r"),
        ("a\u202eb", "a\\u202eb"),  # right-to-left override
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("\x9b31m", "\\x9b31m"),  # C1 control sequence introducer
    ],
)
def test_literal_makes_control_characters_visible(raw, shown):
    assert literal(raw) == shown
    assert literal(raw).isprintable()


@pytest.mark.parametrize("name", ["bn1", "[/red]", "/layer1/layer1.0/bn1", "conv 1", "caf\u00e9", "\u6279\u91cf"])
def test_literal_leaves_printable_names_alone(name):
    assert literal(name) == name


def test_plural_agrees_with_the_count():
    assert [plural(n, "sample") for n in (0, 1, 2)] == ["0 samples", "1 sample", "2 samples"]
    assert plural(3, "info", "info") == "3 info"


def test_shorten_middle_drops_middle_components_as_the_brief_shows():
    assert shorten_middle("/layer1/layer1.0/bn1/BatchNormalization", 34) == "/layer1/.../bn1/BatchNormalization"


def test_a_name_that_fits_is_unchanged():
    assert shorten_middle(TORCH_NAMES[0], len(TORCH_NAMES[0])) == TORCH_NAMES[0]


@pytest.mark.parametrize("width", [12, 16, 20, 24, 30, 34, 40, 60])
def test_shortened_names_fit_and_stay_apart_where_they_can(width):
    shortened = shorten_names(TORCH_NAMES, width)
    assert all(len(s) <= width for s in shortened)
    if width >= 20:  # room for one distinguishing component besides the ellipses
        assert len(set(shortened)) == len(TORCH_NAMES), shortened


def test_names_without_components_are_cut_in_the_middle_of_their_characters():
    assert shorten_middle("conv2_block1_1_bn_very_long_name", 15) == "conv2_...g_name"
    assert shorten_middle("abcdef", 1) == "f"


def test_names_without_components_are_cut_apart_where_the_balanced_cut_would_merge_them():
    # wired-table-rec's fix table at 80 columns: two rows read "backbone...oder.0.bn"
    names = ["backbone.encoder.0.bn", "backbone.decoder.0.bn", "backbone.encoder.1.bn"]
    shortened = shorten_names(names, 20)
    assert len(set(shortened)) == 3 and all(len(s) <= 20 for s in shortened)
    assert shortened[2] == "backbone...oder.1.bn"  # alone in its cut: the balanced one


@pytest.mark.parametrize("width", [20, 28])
def test_module_paths_that_differ_only_inside_stay_apart(width):
    """spindle_eeg's heads: head.bottleneck_{detection,segmentation}.layers.N.downscale.batchnorm differ in two
    places of their middle; 8 of 12 rows read head.bottlen...ale.batchnorm alike in fix's and probe's tables."""
    names = [
        f"head.bottleneck_{head}.layers.{n}.downscale.batchnorm"
        for head in ("detection", "segmentation")
        for n in range(4)
    ] + [f"head.segmentation_neck.{n}.batchnorm" for n in range(4)]
    shortened = shorten_names(names, width)
    assert len(set(shortened)) == len(names), shortened
    assert all(len(s) <= width for s in shortened)
    assert shortened[0] == "..." + shortened[0].strip(".") + "..." and "layers.0" in shortened[0]
