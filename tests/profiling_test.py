"""golf_jax.tools.profiling: kernel categories, collective overlap from trace spans,
and the HLO analysis (source lines, bytes moved) on a small hand-written module."""

from __future__ import annotations

import pytest

from golf_jax.tools import profiling


def test_kernel_categories():
    assert profiling.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profiling.kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profiling.kernel_category("loop_multiply_fusion_3") == "xla fusion"
    assert profiling.kernel_category("up_act_kernel") == "triton mlp"
    assert profiling.kernel_category("ncclDevKernel_AllReduce_Sum_bf16") == "collective"


def test_collective_overlap_from_trace_spans():
    """Two devices: on 0 an all-reduce of 10 us, 6 us of it beside a GEMM; on 1
    one of 4 us alone. Microseconds in, ms per repeat out."""
    spans = [
        {"pid": 0, "name": "ncclDevKernel_AllReduce_Sum_bf16", "ts": 100.0, "dur": 10.0},
        {"pid": 0, "name": "nvjet_sm90_tst_128x128", "ts": 94.0, "dur": 10.0},  # 100..104 overlaps
        {"pid": 0, "name": "loop_add_fusion_3", "ts": 106.0, "dur": 2.0},  # 106..108 overlaps
        {"pid": 0, "name": "loop_add_fusion_4", "ts": 107.0, "dur": 2.0},  # 108..109 more (107..108 merged)
        {"pid": 0, "name": "loop_add_fusion_5", "ts": 120.0, "dur": 5.0},  # after it
        {"pid": 1, "name": "ncclDevKernel_ReduceScatter", "ts": 0.0, "dur": 4.0},
        {"pid": 1, "name": "loop_add_fusion_3", "ts": 4.0, "dur": 2.0},
    ]
    got = profiling.collective_overlap(spans, repeats=1)
    assert got[0]["collective_ms"] == pytest.approx(0.010) and got[0]["overlapped_ms"] == pytest.approx(0.007)
    assert got[1]["collective_ms"] == pytest.approx(0.004) and got[1]["overlapped_ms"] == 0.0


HLO = """HloModule jit_loss, is_scheduled=true

%fused_computation.1 (p0: bf16[4,8], p1: bf16[4,8]) -> bf16[4,8] {
  %p0 = bf16[4,8]{1,0} parameter(0)
  %p1 = bf16[4,8]{1,0} parameter(1)
  ROOT %multiply.1 = bf16[4,8]{1,0} multiply(%p0, %p1), metadata={op_name="jit(loss)/mul" stack_frame_id=2}
}

ENTRY %main (a: bf16[4,8], b: bf16[4,8]) -> (bf16[4,8], f32[]) {
  %a = bf16[4,8]{1,0} parameter(0)
  %b = bf16[4,8]{1,0} parameter(1)
  %loop_multiply_fusion.2 = bf16[4,8]{1,0} fusion(%a, %b), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(loss)/mul" stack_frame_id=2}
  ROOT %t = (bf16[4,8]{1,0}, f32[]) tuple(%loop_multiply_fusion.2, %c)
}

FileNames
1 "/x/golf_jax/model.py"

FunctionNames
1 "block"
2 "rms_norm"

FileLocations
1 {file_name_id=1 function_name_id=1 line=300 end_line=300 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=148 end_line=148 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
"""


def test_hlo_sources_and_fusion_bytes():
    """A fusion's kernel ("loop_multiply_fusion_2") gets its ops' model lines
    (innermost frame first) and its traffic: two bf16 [4, 8] operands and one
    result, 3 x 64 bytes; a kernel called 5 times moves 5 times that."""
    sources = profiling.hlo_sources(HLO)
    assert sources["loop_multiply_fusion_2"] == "mul @ rms_norm:148<block:300"
    nbytes = profiling.hlo_fusion_bytes(HLO)
    assert nbytes == {"loop_multiply_fusion_2": 3 * 4 * 8 * 2}
    t = profiling.fusion_traffic({"loop_multiply_fusion_2": [0.001, 5], "nvjet_gemm": [1.0, 1]}, nbytes, hbm_gbps=1.0)
    assert t["fusions"] == 1 and t["gbytes"] == pytest.approx(5 * 192 / 1e9) and t["floor_ms"] == pytest.approx(5 * 192 / 1e6)
    assert t["achieved_gbps"] == pytest.approx(5 * 192 / 1e9 / 1e-6) and t["unmatched_ms"] == 0
