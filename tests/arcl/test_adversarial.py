"""AR and CL are found from dataflow, never from a size that happens to match.

Each source graph is a zoo model exported with an AR that equals another size of the model: the
number of query heads, the head dim, the number of KV heads, or the past length. The rewrite must
move only the AR axes (checked on the Reshape targets it rewrites) and every variant must pass the
token loop against the source.
"""

from __future__ import annotations

import pytest

from mha2sha import zoo
from tests.arcl._helpers import build

# (case, source AR, source CL, what AR coincides with)
SOURCES = [
    ("llama_gqa_step", 8, 17, "heads"),
    ("prepared_llama_gqa_step", 8, 17, "heads"),
    ("adv_llama_ar_eq_heads", 4, 18, "heads"),
    ("llama_gqa_step", 12, 20, "head_dim"),
    ("prepared_llama_gqa_step", 12, 20, "head_dim"),
    ("adv_llama_hd_eq_heads", 8, 17, "head_dim and heads"),
    ("llama_gqa_step", 2, 17, "kv_heads"),
    ("prepared_llama_gqa_step", 2, 17, "kv_heads"),
    ("llama_step", 7, 14, "past"),
    ("prepared_llama_gqa_step", 7, 14, "past"),
]


@pytest.mark.parametrize(
    ("case", "ar", "cl", "what"), SOURCES, ids=[f"{c}-ar{a}-{w}" for c, a, _, w in SOURCES]
)
def test_ar_equal_to_another_size(case, ar, cl, what, tmp_path):
    info = zoo.CASES[case]
    source = zoo.build(case, ar=ar, cl=cl)
    record = build(source, [1, 3], cl + 5, tmp_path)
    assert [(v.ar, v.cl) for v in record.variants] == [(1, cl + 5), (3, cl + 5)]
    # the q/k/v view targets [1, AR, heads, head_dim] keep heads and head_dim, whatever AR was
    for variant in record.variants:
        views = [c for c in variant.constants if c.meaning.startswith("values [1, AR, ")]
        assert views, [c.meaning for c in variant.constants]
        for c in views:
            old, new = eval(c.old), eval(c.new)  # small int lists
            assert old[1] == ar and new[1] == variant.ar and old[2:] == new[2:], c
            if len(new) == 4:  # [1, AR, heads, head_dim]; [1, AR, hidden] merges the heads back
                assert new[2] in (info.heads, info.kv_heads, -1) and new[3] in (info.head_dim, -1), c
