# `microdit serve` end to end (tests/serve_e2e.sh): a tiny trained checkpoint (fixture), the API
# over curl with a clean Ctrl-C stop, and headless Chromium making pictures on the page. Each
# says "SKIPPED:" (a visible ctest skip) where fonts, MiniLM assets, curl or Chromium are missing.
set(MD_SERVE_WORK "${CMAKE_CURRENT_BINARY_DIR}/serve_e2e")
foreach(step fixture api browser)
  add_test(NAME serve.${step} COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/tests/serve_e2e.sh ${step}
           $<TARGET_FILE:microdit> ${MD_SERVE_WORK})
  set_tests_properties(serve.${step} PROPERTIES TIMEOUT 300 SKIP_REGULAR_EXPRESSION "SKIPPED:")
endforeach()
set_tests_properties(serve.fixture PROPERTIES FIXTURES_SETUP serve_ckpt)
set_tests_properties(serve.api serve.browser PROPERTIES FIXTURES_REQUIRED serve_ckpt RESOURCE_LOCK serve_e2e)

# The same bounds on the command line (eval/sampling_limits.h): one-line errors, nothing written.
md_error_test(cli.sample_cfg_nan "guidance \\(cfg\\) must be a number in \\[0, 100\\], got nan"
              sample --ckpt /nonexistent.safetensors --prompt x --cfg nan --out /tmp/md_unused.png)
md_error_test(cli.sample_n_unbounded "images per prompt must be in \\[1, 64\\], got 100000000"
              sample --ckpt /nonexistent.safetensors --prompt x --n 100000000)
md_error_test(cli.serve_missing_ckpt "/nonexistent.safetensors: no such file" serve --ckpt /nonexistent.safetensors)
md_error_test(cli.serve_bad_precision "--precision: expected auto, bf16 or fp32, got 'half'"
              serve --ckpt /nonexistent.safetensors --precision half)
md_error_test(cli.serve_bad_port "--port must be in \\[0, 65535\\]"
              serve --ckpt /nonexistent.safetensors --port 70000)
