"""The 1.0611 record's quantisation (quant.scheme = "sdclip"; the reference's
gptq_mixed_quantize, L2220, and dequantize_mixed): GPTQ with SDClip scales,
per-row int8 sparse-gate weights, fp16 passthrough, LQER corrections.

It works on the reference's flat names, banks split into per-layer matrices
(`unbank`: "blocks.3.attn.c_q.weight", "tok_emb.weight", ...), so its result
keys are the reference's own and its per-group serialisation reads them as is.

A `FrontierQuantized` holds, by key (numpy arrays on the host):
    "<name>.q" int8 [out, in], "<name>.scale" float16 [out]     GPTQ (int6; int7 tok_emb)
    "<name>.gq" int8 [H, w], "<name>.gs" float16 [H]            per-row int8 attn_gate_w
    "<name>" float16 (or the tensor itself if not floating)      passthrough
    "<name>.lqA_a" int8 [out, r] in [-2, 1], ".lqAs_a" float16 [] (one scale),
    "<name>.lqB_a" int8 [r, in] in [-8, 7], ".lqBs_a" float16 [r in / group]     LQER (asymmetric)
    "<name>.lqA", ".lqAs" [out], ".lqB", ".lqBs" [r]            LQER (symmetric fallback)
and meta[name]: "gptq (int6)", "gptq (int7)", "+lqer_asym" / "+lqer" appended,
"gate_int8_row" or "passthrough (float16)", the reference's strings.
Dequantised: W = q s + (qA sA)(qB sB) (`dequantize_state`, `dequantize_params`).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import compat, param_tree, quant
from golf_jax.config import ModelConfig, QuantConfig
from golf_jax.param_tree import Params
from golf_jax.quant import QuantError

DAMPING = quant.DAMPING_LADDER[0]  # the reference's 1%: the ladder's later steps only where it would fail
GATE_RANGE = 127
# reference quirk: the gate rule takes attn_gate_w of 32..8192 values (dense (8, 512) and sparse (8, 12)).
GATE_NUMEL = (32, 8192)
LQER_A_RANGE = (-2, 1)  # asymmetric int2
LQER_B_RANGE = (-8, 7)  # int4
# The reference's per-layer names of the bank rows: bank -> (first half, second half).
BANK_ROWS = {"qo_bank": ("attn.c_q.weight", "attn.proj.weight"), "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
             "mlp_up_bank": ("mlp.fc.weight",), "mlp_down_bank": ("mlp.proj.weight",)}


class FrontierQuantized(NamedTuple):
    arrays: dict  # key -> np.ndarray (module docstring)
    meta: dict  # reference name -> how it is stored


# ----------------------------------------------------------------------------- names

def unbank(state: dict, num_layers: int) -> dict:
    """Reference names with the banks split into per-layer matrices (the reference's _unbank_state_dict)."""
    out = {}
    for name, x in state.items():
        if name not in BANK_ROWS:
            out[name] = x
            continue
        for i in range(num_layers):  # layer by layer, as the reference's
            for half, suffix in enumerate(BANK_ROWS[name]):
                out[f"blocks.{i}.{suffix}"] = x[half * num_layers + i]
    return out


def rebank(flat: dict, num_layers: int) -> dict:
    """Inverse of `unbank`."""
    rows = {bank: [f"blocks.{i}.{suffix}" for suffix in suffixes for i in range(num_layers)]
            for bank, suffixes in BANK_ROWS.items()}
    split = {name for names in rows.values() for name in names}
    out = {k: v for k, v in flat.items() if k not in split}
    out.update({bank: np.stack([flat[name] for name in names]) for bank, names in rows.items()})
    return out


def reference_hessians(hessians: dict, num_layers: int) -> dict:
    """golf_jax.hessians' stacked Hessians ({"qo_bank": [2L, d, d], ..., "tok_emb": [d, d]})
    under the reference's per-matrix names."""
    out = unbank({k: v for k, v in hessians.items() if k in BANK_ROWS}, num_layers)
    if "tok_emb" in hessians:
        out["tok_emb.weight"] = hessians["tok_emb"]
    return out


# ----------------------------------------------------------------------------- GPTQ with SDClip scales

def sdclip_scales(W_OxI: jax.Array, clip_sigmas: jax.Array, clip_range: int) -> jax.Array:
    """fp16(k std(row) / clip_range), the sample std (n - 1), floored at 1e-10 before the fp16
    rounding (reference quirk: the floor rounds to 0), as float32 values."""
    std_O = jnp.std(W_OxI, axis=1, ddof=1)
    s = jnp.maximum(clip_sigmas.astype(jnp.float32) * std_O / jnp.float32(clip_range), jnp.float32(1e-10))
    return quant.to_fp16(s)


def _gptq_sdclip_one(W_OxI, H_IxI, clip_sigmas, clip_range: int, block_size: int):
    W_OxI, H_IxI = W_OxI.astype(jnp.float32), H_IxI.astype(jnp.float32)
    dead_I = jnp.diag(H_IxI) == 0  # inputs that never fire: their weights are zeroed
    H_IxI = H_IxI + jnp.diag(jnp.where(dead_I, 1.0, 0.0))
    diag = jnp.diag(H_IxI)
    perm = jnp.argsort(-(diag + jnp.float32(DAMPING) * jnp.mean(diag)), stable=True)  # act-order
    inv_perm = jnp.argsort(perm)
    Wp_OxI = jnp.where(dead_I[perm][None, :], 0.0, W_OxI[:, perm])
    U_IxI, damping, ok = quant.inverse_factor(H_IxI[perm][:, perm])
    s_O = sdclip_scales(W_OxI, clip_sigmas, clip_range)  # from the unpermuted W, dead columns included
    # A row without spread gets the scale 0 (its 1e-10 floor rounds to 0 in fp16) and dequantises
    # to 0 whatever its q: its q is taken at step 1, where the reference divides by 0.
    step_O = jnp.where(s_O > 0, s_O, 1.0)
    q_OxI = quant.gptq_pass(Wp_OxI, U_IxI, step_O, clip_range, block_size)[:, inv_perm]
    q_rows = jnp.clip(jnp.round(W_OxI / step_O[:, None]), -clip_range, clip_range)
    return jnp.where(ok, q_OxI, q_rows).astype(jnp.int8), s_O.astype(jnp.float16), damping, ~ok


_gptq_sdclip_bank = jax.jit(jax.vmap(_gptq_sdclip_one, in_axes=(0, 0, 0, None, None)), static_argnums=(3, 4),
                            compiler_options={"xla_gpu_autotune_level": 0})  # see quant._gptq_bank


def gptq_sdclip(W_NxOxI, H_NxIxI, clip_sigmas_N, clip_range: int, block_size: int = 128, name: str = "matrices"):
    """GPTQ (act-order, lazy batch updates, 1% damping) of N matrices of one shape at the
    SDClip scales, no search: (q int8 [N, O, I], scale float16 [N, O], quant.GPTQReport).
    Where the Cholesky factorisation fails at 1%, quant.DAMPING_LADDER's larger steps, then
    rounding at the same scales, take over (the reference has no fallback)."""
    W, H = jnp.asarray(W_NxOxI, jnp.float32), jnp.asarray(H_NxIxI, jnp.float32)
    if W.ndim != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise QuantError(f"{name}: Hessians {tuple(H.shape)} do not fit weights {tuple(W.shape)}")
    for what, x in (("W", W), ("H", H)):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise QuantError(f"{name}: {what} holds NaN or inf")
    cs = jnp.broadcast_to(jnp.asarray(clip_sigmas_N, jnp.float32), W.shape[:1])
    q, s, damping, fallback = _gptq_sdclip_bank(W, H, cs, clip_range, block_size)
    return np.asarray(q), np.asarray(s), quant.GPTQReport(np.asarray(damping), np.asarray(fallback))


# ----------------------------------------------------------------------------- gate and LQER (numpy, float32)

def quantize_gate_int8_rows(W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row int8 in [-127, 127] at fp16(max|row| / 127); unlike quant.quantize_int8_rows
    the division is by the fp16-rounded scale, as the reference's _quantize_gate_int8_row."""
    W = np.asarray(W, np.float32)
    s = (np.maximum(np.abs(W).max(axis=-1), np.float32(1e-10)) / np.float32(GATE_RANGE)).astype(np.float16)
    q = np.clip(np.round(W / s.astype(np.float32)[..., None]), -GATE_RANGE, GATE_RANGE)
    return q.astype(np.int8), s


def lqer_factors(E_OxI: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A = U_r S_r [O, r], B = V_r^T [r, I] of the error's thin SVD (LAPACK's gesdd, float32,
    on the host as the reference's torch.linalg.svd on the CPU). The packed int2 A depends on
    the SVD's signs (its range [-2, 1] is asymmetric): they are LAPACK's, as the reference's."""
    U, S, Vh = np.linalg.svd(np.asarray(E_OxI, np.float32), full_matrices=False)
    r = min(rank, S.size)
    return factors_from_svd(U, S, Vh, r)


def factors_from_svd(U: np.ndarray, S: np.ndarray, Vh: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    return ((U[:, :rank] * S[:rank]).astype(np.float32), np.ascontiguousarray(Vh[:rank], np.float32))


def pack_lqer_asym(A: np.ndarray, B: np.ndarray, group: int) -> dict:
    """A int2 in [-2, 1] at one fp16 scale max|A| / 1.5; B int4 in [-8, 7] in groups of
    `group` consecutive values of B (row-major) at fp16 max|group| / 7.5."""
    sA = np.float16(max(np.abs(A).max(), np.float32(1e-10)) / np.float32(1.5))
    qA = np.clip(np.round(A / np.float32(sA)), *LQER_A_RANGE).astype(np.int8)
    Bg = B.reshape(-1, group)
    sB = (np.maximum(np.abs(Bg).max(axis=1), np.float32(1e-10)) / np.float32(7.5)).astype(np.float16)
    qB = np.clip(np.round(Bg / sB.astype(np.float32)[:, None]), *LQER_B_RANGE).astype(np.int8).reshape(B.shape)
    return {".lqA_a": qA, ".lqAs_a": np.asarray(sA), ".lqB_a": qB, ".lqBs_a": sB}


def pack_lqer_sym(A: np.ndarray, B: np.ndarray, bits: int) -> dict:
    """A and B per-row symmetric int(bits), fp16 max|row| / (2^(bits-1) - 1) scales."""
    rng = 2 ** (bits - 1) - 1
    out = {}
    for tag, X in (("A", A), ("B", B)):
        s = (np.maximum(np.abs(X).max(axis=1), np.float32(1e-10)) / np.float32(rng)).astype(np.float16)
        out[f".lq{tag}"] = np.clip(np.round(X / s.astype(np.float32)[:, None]), -rng, rng).astype(np.int8)
        out[f".lq{tag}s"] = s
    return out


def lqer_correction(arrays: dict, name: str, meta: str) -> np.ndarray | None:
    """(qA sA)(qB sB) of a matrix stored with LQER, float32; None without."""
    if "lqer_asym" in meta:
        qB, sB = arrays[name + ".lqB_a"], arrays[name + ".lqBs_a"]
        B = (qB.reshape(sB.size, -1).astype(np.float32) * sB.astype(np.float32)[:, None]).reshape(qB.shape)
        return (arrays[name + ".lqA_a"].astype(np.float32) * np.float32(arrays[name + ".lqAs_a"])) @ B
    if "lqer" in meta:
        A = arrays[name + ".lqA"].astype(np.float32) * arrays[name + ".lqAs"].astype(np.float32)[:, None]
        B = arrays[name + ".lqB"].astype(np.float32) * arrays[name + ".lqBs"].astype(np.float32)[:, None]
        return A @ B
    return None


# ----------------------------------------------------------------------------- the whole model

def _floating(x: np.ndarray) -> bool:
    return x.dtype.kind == "f" or x.dtype.name == "bfloat16"  # ml_dtypes' bfloat16 is not np.floating


def storage(name: str, x: np.ndarray, qcfg: QuantConfig) -> str:
    """"gate", "passthrough" or "gptq": the reference's routing, in its order."""
    floating = _floating(x)
    if (qcfg.gate_int8 and floating and x.ndim == 2 and name.endswith(".attn_gate_w")
            and GATE_NUMEL[0] <= x.size <= GATE_NUMEL[1]):
        return "gate"
    if not floating or x.size <= qcfg.keep_float_max_numel:
        return "passthrough"
    return "gptq"


def clip_rule(name: str, qcfg: QuantConfig) -> tuple[float, int]:
    """(k, clip_range) of a GPTQ'd matrix by its role, as the reference matches its name."""
    if "tok_emb" in name:
        return qcfg.embed_clip_sigmas, qcfg.embed_clip_range
    k = (qcfg.mlp_clip_sigmas if ".mlp." in name else qcfg.attn_clip_sigmas if ".attn." in name
         else qcfg.matrix_clip_sigmas)
    return k, qcfg.clip_range


def _gptq_all(sd: dict, names: list[str], hessians: dict, qcfg: QuantConfig, arrays: dict, meta: dict) -> dict:
    """GPTQ every named matrix, one compiled program per (shape, clip_range); their report."""
    missing = [n for n in names if n not in hessians]
    if missing:
        raise QuantError(f"{missing[0]}: {sd[missing[0]].size:,} values (> quant.keep_float_max_numel) and no "
                         f"Hessian: the sdclip scheme GPTQs the bank matrices and the tied embedding only")
    groups: dict = {}
    for n in names:
        k, cr = clip_rule(n, qcfg)
        groups.setdefault((sd[n].shape, cr), []).append((n, k))
    report = {}
    for (_, cr), members in groups.items():
        W = np.stack([np.asarray(sd[n], np.float32) for n, _ in members])
        H = np.stack([np.asarray(hessians[n], np.float32) for n, _ in members])
        q, s, rep = gptq_sdclip(W, H, [k for _, k in members], cr, qcfg.gptq_block_size, members[0][0])
        for i, (n, _) in enumerate(members):
            arrays[n + ".q"], arrays[n + ".scale"] = q[i], s[i]
            meta[n] = f"gptq (int{(cr + 1).bit_length()})"
            fell = bool(rep.fallback[i])
            report[n] = {"method": "rows" if fell else "gptq", "fallback": fell,
                         "damping": None if fell else round(float(rep.damping[i]), 6)}
    return report


def _add_lqer(sd: dict, names: list[str], qcfg: QuantConfig, arrays: dict, meta: dict) -> list[str]:
    """LQER on the lqer_top_k matrices of largest ||W - q s|| (Frobenius); their names."""
    errors = {}
    for n in names:
        E = np.asarray(sd[n], np.float32) - arrays[n + ".q"].astype(np.float32) * \
            arrays[n + ".scale"].astype(np.float32)[:, None]
        errors[n] = (E, float(np.linalg.norm(E)))
    top = sorted(errors, key=lambda n: -errors[n][1])[:qcfg.lqer_top_k]  # stable: ties keep state order
    for n in top:
        A, B = lqer_factors(errors[n][0], qcfg.lqer_rank)
        g = qcfg.lqer_asym_group
        if g > 0 and B.size % g == 0:
            packed, tag = pack_lqer_asym(A, B, g), "+lqer_asym"
        else:
            packed, tag = pack_lqer_sym(A, B, qcfg.lqer_factor_bits), "+lqer"
        arrays.update({n + k: v for k, v in packed.items()})
        meta[n] += tag
    return top


def quantize_state(sd: dict, hessians: dict, qcfg: QuantConfig) -> tuple[FrontierQuantized, dict]:
    """The reference's gptq_mixed_quantize of a flat state (reference names, banks unbanked):
    (FrontierQuantized, report {"matrices": {name: {method, damping, fallback}}, "lqer": [names],
    "gptq_seconds"}). hessians: name -> [in, in] for each matrix GPTQ takes."""
    arrays, meta, gptq_names = {}, {}, []
    for name, x in sd.items():
        x = np.asarray(x)
        if _floating(x) and not np.all(np.isfinite(x.astype(np.float32))):
            raise QuantError(f"{name}: holds NaN or inf")
        kind = storage(name, x, qcfg)
        if kind == "gate":
            arrays[name + ".gq"], arrays[name + ".gs"] = quantize_gate_int8_rows(x)
            meta[name] = "gate_int8_row"
        elif kind == "passthrough":
            arrays[name] = x.astype(np.float16) if _floating(x) else x
            meta[name] = "passthrough (float16)"
        else:
            gptq_names.append(name)
    start = time.perf_counter()
    matrices = _gptq_all(sd, gptq_names, hessians, qcfg, arrays, meta)
    gptq_seconds = time.perf_counter() - start
    top = _add_lqer(sd, gptq_names, qcfg, arrays, meta) if qcfg.lqer_top_k > 0 and gptq_names else []
    meta = {name: meta[name] for name in sd}  # the state's order
    return FrontierQuantized(arrays, meta), {"matrices": matrices, "lqer": top, "gptq_seconds": gptq_seconds}


def quantize_params(params: Params, cfg: ModelConfig, hessians: dict, qcfg: QuantConfig
                    ) -> tuple[FrontierQuantized, dict]:
    """`quantize_state` of a params tree, with golf_jax.hessians' stacked Hessians
    (collect_hessians(..., embedding=True): "qo_bank" [2L, d, d], ..., "tok_emb" [d, d])."""
    sd = unbank(compat.params_to_reference(jax.device_get(params), cfg), cfg.num_layers)
    hessians = reference_hessians(jax.device_get(hessians), cfg.num_layers)
    return quantize_state(sd, hessians, qcfg)


def dequantize_state(fq: FrontierQuantized) -> dict:
    """Reference name -> float32 values (the passthrough's fp16 widened; ints as stored)."""
    out = {}
    for name, how in fq.meta.items():
        a = fq.arrays
        if how.startswith("passthrough"):
            out[name] = a[name].astype(np.float32) if a[name].dtype == np.float16 else a[name]
        elif how == "gate_int8_row":
            out[name] = a[name + ".gq"].astype(np.float32) * a[name + ".gs"].astype(np.float32)[..., None]
        else:
            W = a[name + ".q"].astype(np.float32) * a[name + ".scale"].astype(np.float32)[:, None]
            correction = lqer_correction(a, name, how)
            out[name] = W if correction is None else W + correction
    return out


def dequantize_params(fq: FrontierQuantized, cfg: ModelConfig) -> Params:
    """The params tree back, in the parameter dtype rule's dtypes (param_tree.cast_params)."""
    state = rebank(dequantize_state(fq), cfg.num_layers)
    return param_tree.cast_params(compat.params_from_reference(state, cfg, "quantised state"), cfg)
