# CLI-level tests: the parity command on the shared reference vectors, the published
# parameter counts, and one-line errors for bad input.
set(MD_SHARED "${CMAKE_CURRENT_SOURCE_DIR}/../shared/reference")
set(MD_VECTOR_FILES "${MD_SHARED}/microdit_parity_a.safetensors")
file(GLOB MD_EXTRA_VECTORS "${CMAKE_CURRENT_SOURCE_DIR}/tests/data/parity_*.safetensors")
list(APPEND MD_VECTOR_FILES ${MD_EXTRA_VECTORS})
foreach(vec ${MD_VECTOR_FILES})
  get_filename_component(name "${vec}" NAME_WE)
  if(EXISTS "${vec}")
    add_test(NAME parity.${name} COMMAND microdit parity --vectors "${vec}" --device cpu)
  else()  # a clone without ../shared beside it: say so, never pass silently
    add_test(NAME parity.${name} COMMAND ${CMAKE_COMMAND} -E echo "SKIPPED: ${vec} not found")
    set_tests_properties(parity.${name} PROPERTIES SKIP_REGULAR_EXPRESSION "SKIPPED")
  endif()
endforeach()

# The expert layers' other dispatches on the CPU: the one-hot products (--moe-dispatch gemm, the
# CUDA default without the fused kernels) and the gathers (the CUDA default).
if(EXISTS "${MD_SHARED}/microdit_parity_a.safetensors")
  add_test(NAME parity.moe_gemm_dispatch COMMAND microdit parity --vectors "${MD_SHARED}/microdit_parity_a.safetensors"
           --device cpu --moe-dispatch gemm)
  add_test(NAME parity.moe_gather_dispatch COMMAND microdit parity --vectors "${MD_SHARED}/microdit_parity_a.safetensors"
           --device cpu --moe-dispatch gather)
endif()

add_test(NAME info.xl_params COMMAND microdit info --preset MicroDiT_XL_2)
set_tests_properties(info.xl_params PROPERTIES PASS_REGULAR_EXPRESSION "parameters: 1165442320 ")
add_test(NAME info.tiny_params COMMAND microdit info --preset MicroDiT_Tiny_2)
set_tests_properties(info.tiny_params PROPERTIES PASS_REGULAR_EXPRESSION "parameters: 200692752 ")

# Bad input: one line naming the problem, non-zero exit, no stack trace.
function(md_error_test name regex)
  string(JOIN "|" args ${ARGN})  # '|' survives add_test; the script splits on it again
  add_test(NAME ${name} COMMAND ${CMAKE_COMMAND} -DBIN=$<TARGET_FILE:microdit>
           "-DARGS=${args}" "-DREGEX=${regex}" -P ${CMAKE_CURRENT_SOURCE_DIR}/tests/expect_error.cmake)
endfunction()
md_error_test(cli.missing_vectors "no such file" parity --vectors /nonexistent.safetensors)
md_error_test(cli.bad_preset "unknown model preset 'Nope'" info --preset Nope)
md_error_test(cli.bad_patch "not divisible by patch_size" info --preset MicroDiT_Tiny_2 --latent-size 33)
md_error_test(cli.bad_device "expected cpu, cuda" info --device tpu)

# The emoji dataset: a small end-to-end run (skipped when the Debian font or data package is
# missing) and one-line errors naming the missing package.
add_test(NAME dataset.emoji_limit COMMAND microdit dataset emoji --limit 24 --size 16
         --out "${CMAKE_CURRENT_BINARY_DIR}/dataset_emoji_test")
set_tests_properties(dataset.emoji_limit PROPERTIES PASS_REGULAR_EXPRESSION "rendered 24 of 24 emoji at 16x16"
                     SKIP_REGULAR_EXPRESSION "install the Debian package")
md_error_test(cli.dataset_missing_font "/nonexistent.ttf: no such file \\(install the Debian package fonts-noto-color-emoji\\)"
              dataset emoji --out /tmp/md_unused --font /nonexistent.ttf)
md_error_test(cli.dataset_missing_emoji_test "/nonexistent.txt: no such file \\(install the Debian package unicode-data\\)"
              dataset emoji --out /tmp/md_unused --emoji-test /nonexistent.txt)
md_error_test(cli.dataset_bad_size "--size must be in" dataset emoji --out /tmp/md_unused --size 2)

# The main job end to end, with the colour-conditioning check (tests/e2e_main_job.sh).
add_test(NAME e2e.main_job_colour_check
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/tests/e2e_main_job.sh $<TARGET_FILE:microdit>
                 ${CMAKE_CURRENT_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/e2e)
set_tests_properties(e2e.main_job_colour_check PROPERTIES TIMEOUT 3600 SKIP_REGULAR_EXPRESSION "SKIPPED:"
                     LABELS e2e)
md_error_test(cli.sample_bad_scale "--n, --steps and --scale must be >= 1"
              sample --ckpt /nonexistent.safetensors --prompt "red heart" --scale 0)
# --precision (auto, bf16 or fp32) of the commands that sample, checked before anything loads.
md_error_test(cli.sample_bad_precision "--precision: expected auto, bf16 or fp32, got 'half'"
              sample --ckpt /nonexistent.safetensors --prompt "red heart" --precision half)
md_error_test(cli.sample_bf16_and_fp32 "--bf16 and --precision fp32 disagree"
              sample --ckpt /nonexistent.safetensors --prompt "red heart" --bf16 --precision fp32)
md_error_test(cli.recall_bad_precision "--precision: expected auto, bf16 or fp32, got 'fp16'"
              eval-recall --ckpt /nonexistent.safetensors --dataset /nonexistent --precision fp16)
md_error_test(cli.colour_bad_precision "--precision: expected auto, bf16 or fp32, got 'x'"
              eval-colour --ckpt /nonexistent.safetensors --precision x)

# eval-recall (issue #10) and the skin-tone-free emoji set: one-line errors, and the option works.
md_error_test(cli.recall_missing_dataset "/nonexistent/captions.jsonl: no such file"
              eval-recall --ckpt /nonexistent.safetensors --dataset /nonexistent)
md_error_test(cli.recall_bad_n "--n and --batch must be >= 1"
              eval-recall --ckpt /nonexistent.safetensors --dataset /nonexistent --n 0)
md_error_test(cli.dataset_bad_skin_tones "--skin-tones must be all or none, got 'some'"
              dataset emoji --out /tmp/md_unused --skin-tones some)
add_test(NAME dataset.emoji_no_skin_tones COMMAND microdit dataset emoji --limit 400 --size 8 --skin-tones none
         --out "${CMAKE_CURRENT_BINARY_DIR}/dataset_emoji_nst_test")
set_tests_properties(dataset.emoji_no_skin_tones PROPERTIES
                     PASS_REGULAR_EXPRESSION "of 400 emoji at 8x8 .*; [1-9][0-9]* skin-tone variants left out"
                     SKIP_REGULAR_EXPRESSION "install the Debian package")

# The GPU-only options refuse a CPU run with one line instead of being ignored.
md_error_test(cli.sample_cuda_graph_on_cpu "--cuda-graph needs --device cuda"
              sample --ckpt /nonexistent.safetensors --prompt "red heart" --cuda-graph --device cpu)
md_error_test(cli.bench_negative_profile "--profile must be >= 0, got -1" bench --profile -1 --device cpu)
md_error_test(cli.bench_no_profile_rows "--profile-rows must be >= 1, got 0" bench --profile-rows 0 --device cpu)
md_error_test(cli.bench_cuda_graph_on_cpu "--cuda-graph needs --device cuda" bench --cuda-graph --device cpu)
md_error_test(cli.bench_bad_sdpa "--sdpa must be flash, cudnn, efficient or math, got 'fast'" bench --sdpa fast --device cpu)
md_error_test(cli.bad_cpu_matmul "--cpu-matmul: expected auto, onednn, mkl or microdit, got 'blas'" bench --cpu-matmul blas --device cpu)
md_error_test(cli.bad_cpu_attention "--cpu-attention: expected auto, float32, aten-float32 or bf16, got .half." bench --cpu-attention half --device cpu)
md_error_test(cli.bad_moe_dispatch "--moe-dispatch: expected auto, index, gemm or gather, got .scatter." bench --moe-dispatch scatter --device cpu)
md_error_test(cli.bench_memory_not_for_sampling "--memory reports a training step" bench --sample --memory --device cpu)
# bf16 weight copies (train/bf16_weights.h): on the CPU only when asked for, and only with bf16.
add_test(NAME cli.bf16_weights_on COMMAND microdit bench --preset MicroDiT_Pico_2 --batch 2 --steps 1 --warmup 1
         --latent-size 8 --caption-len 4 --bf16 --bf16-weights on --device cpu --threads 1)
set_tests_properties(cli.bf16_weights_on PROPERTIES PASS_REGULAR_EXPRESSION "bf16 autocast( \\(emulated[^)]*\\))?, bf16 weight copies")
md_error_test(cli.bad_bf16_weights "--bf16-weights: expected auto, on or off, got .yes." bench --bf16-weights yes --device cpu)
md_error_test(cli.bf16_weights_need_bf16 "--bf16-weights on needs bf16 autocast" bench --bf16-weights on --device cpu)
md_error_test(cli.bad_fused_kernels "--fused-kernels: expected on, off, block or warp, got .maybe." bench --fused-kernels maybe --device cpu)
# "block" (the CUDA kernels of a block per row) and "warp" (its name while it was not the
# default) are accepted everywhere; on the CPU both are the fused CPU kernels.
foreach(mode block warp)
  add_test(NAME cli.fused_kernels_${mode} COMMAND microdit bench --sample --preset MicroDiT_Pico_2 --n 2 --batch 2
           --sampler-steps 2 --caption-len 4 --device cpu --threads 1 --fused-kernels ${mode})
  set_tests_properties(cli.fused_kernels_${mode} PROPERTIES PASS_REGULAR_EXPRESSION
                       "fused kernels \\((avx512|avx2|x86-64)\\).*images/s")
endforeach()
md_error_test(cli.bad_recompute_ffn "--recompute-ffn: expected off, cuda or always, got .sometimes." bench --recompute-ffn sometimes --device cpu)

# bench --profile on the CPU lists the operators by self time, for training and for sampling,
# and names the fused kernels' instruction set; a second table charges the same times to call
# sites: the outermost operator (here an autograd node), the operator and its tensor inputs.
add_test(NAME cli.bench_profile_cpu_train COMMAND microdit bench --preset MicroDiT_Pico_2 --batch 2 --steps 1
         --warmup 1 --caption-len 4 --device cpu --threads 1 --cpu-matmul onednn --profile 1)
set_tests_properties(cli.bench_profile_cpu_train PROPERTIES PASS_REGULAR_EXPRESSION
                     "fused kernels \\((avx512|avx2|x86-64)\\).*CPU operators over 1 more steps:.*CPU operator \\(self time\\).*mkldnn::_linear_pointwise.*operators [0-9.]+ ms on [0-9]+ threads.*call site\n.*(ScaledDotProductFlashAttentionForCpuBackward0 > aten::_scaled_dot_product_flash_attention_for_cpu_backward|CpuAttentionFn > microdit::attention_backward_f32) f32\\[2,4,256,32\\], f32\\[2,4,256,32\\]")
add_test(NAME cli.bench_profile_cpu_sample COMMAND microdit bench --sample --preset MicroDiT_Pico_2 --n 2 --batch 2
         --sampler-steps 2 --caption-len 4 --device cpu --threads 1 --profile 1)
set_tests_properties(cli.bench_profile_cpu_sample PROPERTIES PASS_REGULAR_EXPRESSION
                     "images/s.*CPU operators over 1 more sampling run\\(s\\):.*(aten::_scaled_dot_product|microdit::attention_forward_f32)")

# bench --memory: where one step's memory goes, from the counted bytes of CPU tensors; with
# --cpu-attention bf16 the attention keeps bf16 tensors, as on a GPU, so the forward pass keeps less.
foreach(att float32 bf16)
  add_test(NAME cli.bench_memory_cpu_${att} COMMAND microdit bench --preset MicroDiT_Pico_2 --batch 4 --steps 1
           --warmup 1 --caption-len 4 --device cpu --threads 1 --workers 1 --bf16 --cpu-attention ${att} --memory)
  set_tests_properties(cli.bench_memory_cpu_${att} PROPERTIES PASS_REGULAR_EXPRESSION
                       "${att}( ATen)? attention.*peak memory [0-9.]+ GiB \\(CPU tensors allocated; process peak RSS [0-9.]+ GiB\\).*memory of one step: [0-9.]+ GiB at its start .* \\+[0-9.e-]+ GiB kept by the forward pass .*peak [0-9.]+ GiB in forward \\+ backward")
endforeach()

# bench --profile-json and tools/compare_profiles.py (what the GPU script puts beside the
# compiled reference's profile): the tool's kinds of work on real kernel names, its table, its
# errors, and bench's file on the CPU. Python's standard library only.
add_test(NAME profile.compare_profiles COMMAND python3 ${CMAKE_CURRENT_SOURCE_DIR}/tests/test_compare_profiles.py
         $<TARGET_FILE:microdit>)
md_error_test(cli.bench_profile_json_needs_profile "--profile-json needs --profile N"
              bench --profile-json /tmp/md_unused.json --device cpu)
md_error_test(cli.bench_profile_json_no_folder "--profile-json /nonexistent/p.json: no such folder /nonexistent"
              bench --profile 1 --profile-json /nonexistent/p.json --device cpu)
