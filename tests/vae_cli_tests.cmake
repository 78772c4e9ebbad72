# microdit vae at the CLI: parity with diffusers (the committed small model, and the SDXL widths
# generated at test time by tools/make_vae_fixtures.py), an encode -> decode round trip, and
# one-line errors for bad input. Uses md_error_test from tests/cli_tests.cmake.
set(MD_VAE_DATA "${CMAKE_CURRENT_SOURCE_DIR}/tests/data")
set(MD_VAE_OUT "${CMAKE_CURRENT_BINARY_DIR}/vae_cli")
file(MAKE_DIRECTORY "${MD_VAE_OUT}")

add_test(NAME vae.parity_small COMMAND microdit vae parity --vae ${MD_VAE_DATA}/vae_small
         --vectors ${MD_VAE_DATA}/vae_small_vectors.safetensors --device cpu --threads 2)
set_tests_properties(vae.parity_small PROPERTIES PASS_REGULAR_EXPRESSION "parity ok")

# SDXL widths (128/256/512/512, 32 groups, 83.7 M random parameters, 335 MB: never committed):
# diffusers writes the weights and vectors for a 40x32 image, then the C++ VAE must match to
# 1e-5 of the largest value. Skips when the venv or diffusers is missing.
set(MD_VAE_PY "${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python")
add_test(NAME vae.parity_sdxl_widths COMMAND sh -c
         "if [ ! -x '${MD_VAE_PY}' ]; then echo 'SKIPPED: no .venv (run scripts/setup.sh)'; exit 0; fi; \
          log='${MD_VAE_OUT}/sdxl.log'; \
          '${MD_VAE_PY}' '${CMAKE_CURRENT_SOURCE_DIR}/tools/make_vae_fixtures.py' sdxl --out '${MD_VAE_OUT}/sdxl' --seed 1 >\"$log\" 2>&1; \
          rc=$?; cat \"$log\"; [ $rc = 0 ] || exit 1; grep -q SKIPPED \"$log\" && exit 0; \
          '$<TARGET_FILE:microdit>' vae parity --vae '${MD_VAE_OUT}/sdxl' --vectors '${MD_VAE_OUT}/sdxl/vectors.safetensors' \
            --device cpu --threads 2; rc=$?; rm -rf '${MD_VAE_OUT}/sdxl'; exit $rc")
set_tests_properties(vae.parity_sdxl_widths PROPERTIES PASS_REGULAR_EXPRESSION "parity ok"
                     SKIP_REGULAR_EXPRESSION "SKIPPED:" TIMEOUT 300)

# Round trip with the small model: a 60x44 PNG -> resize + crop to 32 -> latents (1, 4, 4, 4) -> PNG.
add_test(NAME vae.encode_small COMMAND microdit vae encode --vae ${MD_VAE_DATA}/vae_small
         --image ${MD_VAE_DATA}/vae_image.png --size 32 --out ${MD_VAE_OUT}/latents.safetensors --device cpu)
set_tests_properties(vae.encode_small PROPERTIES FIXTURES_SETUP vae_latents
                     PASS_REGULAR_EXPRESSION "60x44 -> mean latents \\[1, 4, 4, 4\\] \\(x 0.13025\\)")
add_test(NAME vae.decode_small COMMAND microdit vae decode --vae ${MD_VAE_DATA}/vae_small
         --latents ${MD_VAE_OUT}/latents.safetensors --out ${MD_VAE_OUT}/decoded.png --device cpu)
set_tests_properties(vae.decode_small PROPERTIES FIXTURES_REQUIRED vae_latents
                     PASS_REGULAR_EXPRESSION "decoded.png: 1 image\\(s\\) of 32x32 decoded")

md_error_test(vae.missing_weights "VAE weights not found: /nonexistent/vae.safetensors"
              vae decode --vae /nonexistent/vae.safetensors --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors
              --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.missing_tensor "vae_small_vectors.safetensors: missing tensor 'encoder.conv_in.weight' .*SDXL config assumed"
              vae decode --vae ${MD_VAE_DATA}/vae_small_vectors.safetensors
              --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.not_safetensors "config.json"
              vae decode --vae ${MD_VAE_DATA}/vae_small/config.json
              --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.bad_config "field 'latent_channels' must be an integer"
              vae decode --vae ${MD_VAE_DATA}/vae_bad_config
              --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.wrong_channels "vae_latents_8ch.safetensors: tensor 'latents' has 8 channels but the VAE .* expects 4"
              vae decode --vae ${MD_VAE_DATA}/vae_small --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors
              --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.no_latents_tensor "vae_small_vectors.safetensors: no tensor 'latents' in this file"
              vae decode --vae ${MD_VAE_DATA}/vae_small --latents ${MD_VAE_DATA}/vae_small_vectors.safetensors
              --out ${MD_VAE_OUT}/unused.png)
md_error_test(vae.bad_image "vae_small/config.json"
              vae encode --vae ${MD_VAE_DATA}/vae_small --image ${MD_VAE_DATA}/vae_small/config.json
              --out ${MD_VAE_OUT}/unused.safetensors)
md_error_test(vae.missing_image "/nonexistent.png"
              vae encode --vae ${MD_VAE_DATA}/vae_small --image /nonexistent.png --out ${MD_VAE_OUT}/unused.safetensors)
md_error_test(vae.bad_size "--size must be a multiple of 8"
              vae encode --vae ${MD_VAE_DATA}/vae_small --image ${MD_VAE_DATA}/vae_image.png --size 30
              --out ${MD_VAE_OUT}/unused.safetensors)
md_error_test(vae.bad_dtype "--dtype must be auto, float32, bfloat16 or float16"
              vae decode --vae ${MD_VAE_DATA}/vae_small --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors
              --out ${MD_VAE_OUT}/unused.png --dtype int8)
md_error_test(vae.out_folder_missing "/nonexistent/out.png: the output folder does not exist"
              vae decode --vae ${MD_VAE_DATA}/vae_small --latents ${MD_VAE_DATA}/vae_latents_8ch.safetensors
              --out /nonexistent/out.png)
md_error_test(vae.parity_mismatch "differs from the vectors by more than"
              vae parity --vae ${MD_VAE_DATA}/vae_small --vectors ${MD_VAE_DATA}/vae_small_vectors.safetensors
              --dtype bfloat16 --device cpu)
