"""Hand-written AIMET encodings documents for the tiny attention model of ``_enc_models``.

Each version has per-tensor, per-channel, per-block and LPBQ weights where the format allows,
fp16 (plain cast) tensors, extra top-level fields and an unknown per-encoding key, so a round
trip exercises every branch. Weights are MatMul ``[in=16, out=16]``: channel axis 1, block axis 0.
"""

from __future__ import annotations

import numpy as np

C = 16
BS = 8
NB = C // BS


def _scales(seed: int, n: int) -> list[float]:
    return [float(v) for v in np.random.default_rng(seed).uniform(0.001, 0.01, n)]


def _ints(seed: int, n: int) -> list[int]:
    return [int(v) for v in np.random.default_rng(seed).integers(1, 16, n)]


QARGS = {
    "activation_bitwidth": 16,
    "dtype": "int",
    "is_symmetric": True,
    "param_bitwidth": 8,
    "per_channel_quantization": True,
    "quant_scheme": "min_max",
}


def doc_061() -> dict:
    def per_tensor(scale: float, offset: float, bw: int, sym: bool) -> list[dict]:
        q = 2**bw - 1
        return [
            {
                "bitwidth": bw,
                "dtype": "int",
                "is_symmetric": str(sym),
                "max": (offset + q) * scale,
                "min": offset * scale,
                "offset": offset,
                "scale": scale,
            }
        ]

    return {
        "version": "0.6.1",
        "activation_encodings": {
            "x": per_tensor(7.3e-05, -36794.0, 16, False),
            "q": per_tensor(6.5e-05, -39385.0, 16, False),
            "p": per_tensor(1.5259021896696422e-05, 0.0, 16, False),
            "k": [{"bitwidth": 16, "dtype": "float"}],
        },
        "param_encodings": {
            "q_w": [
                {
                    "bitwidth": 8,
                    "dtype": "int",
                    "is_symmetric": "True",
                    "max": 127 * s,
                    "min": -128 * s,
                    "offset": -128,
                    "scale": s,
                    "vendor_note": i,
                }
                for i, s in enumerate(_scales(1, C))
            ],
            "o_w": per_tensor(0.004, -128.0, 8, True),
        },
        "quantizer_args": QARGS,
        "excluded_layers": [],
    }


def doc_100() -> dict:
    return {
        "producer": {"package": "hand", "version": "0"},
        "version": "1.0.0",
        "activation_encodings": [
            {
                "bw": 16,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": False,
                "name": "x",
                "offset": [-36794.0],
                "scale": [7.3e-05],
            },
            {
                "bw": 16,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": True,
                "name": "k",
                "offset": [-32768.0],
                "scale": [8.9e-05],
            },
            {
                "bw": 16,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": False,
                "name": "p",
                "offset": [0],
                "scale": [1.5e-05],
            },
            {"bw": 16, "dtype": "FLOAT", "enc_type": "PER_TENSOR", "name": "v"},
            {
                "bw": 2,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": True,
                "name": "s",
                "offset": [-2.0],
                "scale": [0.5],
                "zero_point_shift": [0.5],
            },
        ],
        "param_encodings": [
            {
                "bw": 8,
                "dtype": "INT",
                "enc_type": "PER_CHANNEL",
                "is_sym": True,
                "name": "q_w",
                "offset": [-128.0] * C,
                "scale": _scales(1, C),
                "custom": {"keep": True},
            },
            {
                "bw": 4,
                "dtype": "INT",
                "enc_type": "PER_BLOCK",
                "is_sym": True,
                "name": "k_w",
                "block_size": BS,
                "offset": [-8.0] * (C * NB),
                "scale": _scales(2, C * NB),
            },
            {
                "bw": 8,
                "dtype": "INT",
                "enc_type": "LPBQ",
                "is_sym": True,
                "name": "v_w",
                "block_size": BS,
                "compressed_bw": 4,
                "offset": [-128] * C,
                "scale": _scales(3, C),
                "per_block_int_scale": _ints(4, C * NB),
            },
            {
                "bw": 8,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": True,
                "name": "o_w",
                "offset": [-128.0],
                "scale": [0.004],
            },
        ],
        "quantizer_args": QARGS,
        "excluded_layers": ["some_layer"],
    }


def _nested(flat: list, rows: int, cols: int) -> list[list]:
    return np.asarray(flat).reshape(rows, cols).tolist()


def doc_200() -> dict:
    blocked = np.asarray(_scales(2, C * NB)).reshape(C, NB).T.tolist()  # [in/bs, out]
    return {
        "producer": {"package": "hand", "version": "0"},
        "version": "2.0.0",
        "encodings": [
            {"name": "q_w", "output_dtype": "int8", "y_scale": _scales(1, C), "axis": 1},
            {"name": "k_w", "output_dtype": "int4", "y_scale": blocked, "axis": 0, "block_size": BS},
            {
                "name": "v_w",
                "output_dtype": "int4",
                "per_channel_float_scale": [_scales(3, C)],
                "per_block_int_scale": np.asarray(_ints(4, C * NB)).reshape(C, NB).T.tolist(),
                "axis": 0,
                "block_size": BS,
            },
            {"name": "o_w", "output_dtype": "int8", "y_scale": 0.004},
            {"name": "q_b", "output_dtype": "int32", "y_scale": [1e-7] * C, "axis": 0},
            {"name": "x", "output_dtype": "uint16", "y_scale": 7.3e-05, "y_zero_point": 36794},
            {"name": "k", "output_dtype": "uint16", "y_scale": 8.9e-05, "y_zero_point": 32768},
            {
                "name": "p",
                "output_dtype": "uint16",
                "y_scale": 1.5e-05,
                "y_zero_point": 0,
                "extra_key": "kept",
            },
            {"name": "ss", "output_dtype": "int16", "y_scale": [6.6e-05]},
            {"name": "s", "output_dtype": "float8e4m3fn", "y_scale": 0.01},
        ],
    }


def doc_210() -> dict:
    doc = doc_200()
    doc["version"] = "2.1.0"
    for e in doc["encodings"]:
        if e["name"] == "v_w":
            e.pop("per_channel_float_scale")
            x = e.pop("per_block_int_scale")
            e["y_scale"] = {"x": x, "x_scale": _scales(3, C), "axis": 1}
    return doc


def hand_100() -> dict:
    """doc_100 with encodings on most attention activations, plus one naming no tensor (ghost)."""
    doc = doc_100()
    acts = [e for e in doc["activation_encodings"] if e["name"] in ("x", "k", "p")]
    for name in ("q", "v", "s", "ctx", "y", "ctx2", "q4"):
        acts.append(
            {
                "bw": 16,
                "dtype": "INT",
                "enc_type": "PER_TENSOR",
                "is_sym": False,
                "name": name,
                "offset": [-30000.0],
                "scale": [1e-4 * (1 + len(name))],
            }
        )
    acts.append(
        {
            "bw": 16,
            "dtype": "INT",
            "enc_type": "PER_TENSOR",
            "is_sym": False,
            "name": "ghost",
            "offset": [0.0],
            "scale": [1.0],
        }
    )
    doc["activation_encodings"] = acts
    return doc


ALL = {"0.6.1": doc_061, "1.0.0": doc_100, "2.0.0": doc_200, "2.1.0": doc_210}
