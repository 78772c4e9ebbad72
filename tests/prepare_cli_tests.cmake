# microdit prepare in latent mode (images + captions -> the reference's latent MDS): one-line
# errors for bad input. The end-to-end runs (resume, corrupt inputs, mosaicml-streaming reading
# the output) are GoogleTest cases in tests/test_prepare_latents.cpp.
set(MD_PREP_OUT "${CMAKE_CURRENT_BINARY_DIR}/prepare_cli_unused")
md_error_test(prepare.both_modes "prepare: give either --dataset \\(pixel shards\\) or --images"
              prepare --dataset /tmp --images /tmp --out ${MD_PREP_OUT})
md_error_test(prepare.images_needs_vae "prepare --images needs --vae"
              prepare --images /tmp --out ${MD_PREP_OUT})
md_error_test(prepare.pixel_rejects_latent_option "prepare: --sizes is for --images"
              prepare --dataset /tmp --sizes 256 --out ${MD_PREP_OUT})
md_error_test(prepare.bad_size "--sizes: 20 is not a positive multiple of 8"
              prepare --images /tmp --vae ${CMAKE_CURRENT_SOURCE_DIR}/tests/data/vae_small --sizes 256,20
              --out ${MD_PREP_OUT})
md_error_test(prepare.missing_source "/nonexistent_images: no such file, folder or matching .tar files"
              prepare --images /nonexistent_images --vae ${CMAKE_CURRENT_SOURCE_DIR}/tests/data/vae_small
              --out ${MD_PREP_OUT})
md_error_test(prepare.mds_without_image_column "no image column"
              prepare --images ${CMAKE_CURRENT_SOURCE_DIR}/tests/data/mds_latent
              --vae ${CMAKE_CURRENT_SOURCE_DIR}/tests/data/vae_small --out ${MD_PREP_OUT})
