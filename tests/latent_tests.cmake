# The paper's data path end to end, small (tests/e2e_latent.sh): images -> prepare (random
# SDXL-architecture VAE, MiniLM) -> latent MDS -> train -> sample --vae -> PNG.
add_test(NAME e2e.latent_path
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/tests/e2e_latent.sh $<TARGET_FILE:microdit>
                 ${CMAKE_CURRENT_SOURCE_DIR} ${CMAKE_CURRENT_BINARY_DIR}/e2e_latent)
set_tests_properties(e2e.latent_path PROPERTIES TIMEOUT 900 SKIP_REGULAR_EXPRESSION "SKIPPED:"
                     LABELS e2e)
