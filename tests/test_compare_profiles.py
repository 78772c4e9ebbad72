#!/usr/bin/env python3
"""tools/compare_profiles.py: the kinds it gives real kernel and operator names, its table on
two files, its one-line errors, and (given the microdit binary) that `bench --profile-json`
writes what it reads.

  python3 tests/test_compare_profiles.py [MICRODIT_BINARY]
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "compare_profiles.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
import compare_profiles as cp  # noqa: E402

failures = []


def check(ok, what):
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        failures.append(what)


# Names from the H200 profiles in docs/logs (session 14), the CPU profiles of `bench`, and
# kernels torch.compile writes (Inductor's Triton names list the operators they fuse).
EXPECTED = {
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "matrix products",
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "matrix products",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matrix products",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1": "attention",
    "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*)": "attention",
    "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4> >": "attention",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel)": "attention",
    "void microdit::kernels::(anonymous namespace)::modln_fwd_warp_kernel<__nv_bfloat16>": "norms, modulation",
    "void microdit::kernels::(anonymous namespace)::gated_bwd_vec_kernel<__nv_bfloat16>": "norms, modulation",
    "triton_per_fused__to_copy_add_native_layer_norm_native_layer_norm_backward_12": "norms, modulation",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous "
    "namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor": "optimizer",
    "void microdit::kernels::(anonymous namespace)::adamw_kernel<float, 4>": "optimizer",
    "void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&)": "activations",
    "void microdit::kernels::(anonymous namespace)::swiglu_bwd_kernel<__nv_bfloat16, 8>": "activations",
    "triton_poi_fused_gelu_gelu_backward_mul_7": "activations",
    "void microdit::kernels::(anonymous namespace)::moe_sum_kernel<__nv_bfloat16>": "expert routing",
    "void at::native::(anonymous namespace)::indexSelectLargeIndex<c10::BFloat16, long, unsigned int, 2, 2, -2, true>": "expert routing",
    "void at::native::sbtopk::gatherTopK<float, unsigned int, 2, false>": "expert routing",
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda>": "copies, casts",
    "void at::native::(anonymous namespace)::CatArrayBatchedCopy_vectorized<at::native::OpaqueType<2u>>": "copies, casts",
    "Memcpy HtoD (Pageable -> Device)": "copies, casts",
    "triton_poi_fused_add_mul_5": "fused (Triton)",
    "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>": "other",
    "microdit::gemm": "matrix products",
    "microdit::gemm_gelu_backward": "matrix products",
    "aten::mm": "matrix products",
    "aten::addmm": "matrix products",
    "microdit::attention_backward_f32": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::native_layer_norm_backward": "norms, modulation",
    "aten::copy_": "copies, casts",
    "aten::topk": "expert routing",
    "aten::add_": "other",
    "SplitNormFn": "norms, modulation",
    "microdit::fused_qkv_norm": "norms, modulation",
    "GatedResidualFn": "norms, modulation",
    "aten::normal_": "other",
    "Optimizer.step#AdamW.step > aten::lerp_": "optimizer",
    "aten::linalg_vector_norm": "optimizer",
}
for name, kind in EXPECTED.items():
    got = cp.kind_of(name)
    check(got == kind, f"{name[:70]!r} -> {kind!r}" + ("" if got == kind else f" (got {got!r})"))


def write(path, program, device, runs, rows):
    with open(path, "w") as f:
        json.dump(dict(program=program, device=device, unit="device activity", runs=runs, wall_ms=100.0,
                       busy_ms=sum(r[1] for r in rows),
                       by_name=[dict(name=n, count=1, ms=ms) for n, ms in rows], by_site=[]), f)


def run(*args):
    r = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


with tempfile.TemporaryDirectory() as d:
    a, b, c = (os.path.join(d, x) for x in ("a.json", "b.json", "c.json"))
    # a: 2 steps of 30 ms products + 10 ms attention; b: 1 step of 20 + 10.
    write(a, "microdit", "cuda", 2, [("nvjet_sm90_x", 60.0), ("flash_fwd_kernel", 20.0)])
    write(b, "reference", "cuda", 1, [("sm90_xmma_gemm", 20.0), ("pytorch_flash::flash_bwd", 10.0)])
    rc, out, err = run(a, b, "--top", "1")

    def row(label):  # the numbers of the table row that starts with label
        return next((ln[len(label):].split() for ln in out.splitlines() if ln.startswith(label + " ")), [])
    check(rc == 0, f"two files: exit 0 (stderr {err.strip()!r})")
    prod = row("matrix products")
    check(prod == ["30.00", "20.00", "10.00", "1.50"], f"products per step 30 vs 20: {prod}")
    allrow = row("all")
    check(allrow == ["40.00", "30.00", "10.00", "1.33"], f"all per step 40 vs 30: {allrow}")
    write(c, "reference", "cpu", 1, [("aten::mm", 5.0)])
    rc, out, err = run(a, c)
    check(rc != 0 and "different devices" in err and len(err.strip().splitlines()) == 1,
          f"different devices: one-line error ({err.strip()!r})")
    with open(c, "w") as f:
        json.dump({"program": "x", "device": "cpu"}, f)
    rc, out, err = run(c)
    check(rc != 0 and "no 'runs'" in err, f"missing key: one-line error ({err.strip()!r})")
    rc, out, err = run(os.path.join(d, "none.json"))
    check(rc != 0 and "none.json" in err, f"missing file: one-line error ({err.strip()!r})")

    if len(sys.argv) > 1:  # the binary's own file, on the CPU
        m = os.path.join(d, "microdit.json")
        r = subprocess.run([sys.argv[1], "bench", "--preset", "MicroDiT_Pico_2", "--latent-size", "8",
                            "--batch", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--device", "cpu",
                            "--profile", "2", "--profile-rows", "3", "--profile-json", m],
                           capture_output=True, text=True)
        check(r.returncode == 0, f"bench --profile-json: exit 0 ({r.stderr.strip()[-200:]!r})")
        with open(m) as f:
            p = json.load(f)
        check(p["program"] == "microdit" and p["device"] == "cpu" and p["runs"] == 2,
              f"bench --profile-json: program, device, runs ({p['program']}, {p['device']}, {p['runs']})")
        total = sum(r["ms"] for r in p["by_name"])
        check(len(p["by_name"]) > 3 and abs(total - p["busy_ms"]) <= 1e-6 * max(total, 1),
              f"every operator written (not only the 3 printed): {len(p['by_name'])} names, "
              f"{total:.3f} vs busy {p['busy_ms']:.3f} ms")
        check(any(cp.kind_of(r["name"]) == "matrix products" for r in p["by_name"]),
              "the CPU profile has matrix products")
        rc, out, err = run(m, m)
        check(rc == 0 and "matrix products" in out, "compare_profiles reads bench's file")
        check(not any(x.endswith(".tmp") or ".tmp." in x for x in os.listdir(d)), "no temporary file left")

print(f"{len(failures)} failure(s)")
sys.exit(1 if failures else 0)
