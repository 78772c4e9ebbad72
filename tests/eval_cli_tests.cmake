# microdit eval at the CLI: FID from statistics files and folders, CLIP score, and one-line errors
# for bad input. The Inception weights are random (tools/make_fid_fixtures.py in the project venv,
# written into the build folder by the eval.fixture test); tests that need them skip without it.
set(MD_EVAL_DATA "${CMAKE_CURRENT_SOURCE_DIR}/tests/data")
set(MD_EVAL_DIR "${CMAKE_CURRENT_BINARY_DIR}/eval_cli")
file(MAKE_DIRECTORY "${MD_EVAL_DIR}/empty" "${MD_EVAL_DIR}/mixed" "${MD_EVAL_DIR}/same")
file(COPY "${MD_EVAL_DATA}/img_1x1.png" "${MD_EVAL_DATA}/img_rgb.png" DESTINATION "${MD_EVAL_DIR}/mixed")
file(COPY "${MD_EVAL_DATA}/img_rgb.png" "${MD_EVAL_DATA}/img_grey.png" "${MD_EVAL_DATA}/img_420.jpg"
     DESTINATION "${MD_EVAL_DIR}/same")
set(MD_EVAL_W "${MD_EVAL_DIR}/fixture/fid_inception_random.pth")
set(MD_EVAL_SKIP "fid_inception_random.pth: no such file")

add_test(NAME eval.fixture COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python
         ${CMAKE_CURRENT_SOURCE_DIR}/tools/make_fid_fixtures.py inception "${MD_EVAL_DIR}/fixture")
set_tests_properties(eval.fixture PROPERTIES FIXTURES_SETUP eval_fid SKIP_REGULAR_EXPRESSION "SKIPPED:")

add_test(NAME eval.fid_stats_files COMMAND microdit eval fid --real ${MD_EVAL_DATA}/fid_stats_a.npz
         --fake ${MD_EVAL_DATA}/fid_stats_a_compressed.npz)
set_tests_properties(eval.fid_stats_files PROPERTIES PASS_REGULAR_EXPRESSION "FID: -?0\\.0000\n")
add_test(NAME eval.fid_folders COMMAND microdit eval fid --real ${MD_EVAL_DIR}/same --fake ${MD_EVAL_DIR}/fixture
         --inception ${MD_EVAL_W} --save-stats ${MD_EVAL_DIR}/fake_stats.npz)
set_tests_properties(eval.fid_folders PROPERTIES FIXTURES_REQUIRED eval_fid SKIP_REGULAR_EXPRESSION "${MD_EVAL_SKIP}"
                     PASS_REGULAR_EXPRESSION "wrote .*fake_stats.npz.*\nFID: [0-9]+\\.[0-9][0-9][0-9][0-9]\n")
# The statistics we wrote, read by NumPy as pytorch-fid reads them.
add_test(NAME eval.npz_numpy COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/.venv/bin/python -c
         "import numpy as np; f = np.load('${MD_EVAL_DIR}/fake_stats.npz'); m, s = f['mu'][:], f['sigma'][:]; assert m.shape == (2048,) and s.shape == (2048, 2048) and m.dtype == np.float64 and np.allclose(s, s.T); print('numpy reads mu', m.shape, 'sigma', s.shape)")
set_tests_properties(eval.npz_numpy PROPERTIES DEPENDS eval.fid_folders FIXTURES_REQUIRED eval_fid
                     PASS_REGULAR_EXPRESSION "numpy reads mu \\(2048,\\) sigma \\(2048, 2048\\)"
                     SKIP_REGULAR_EXPRESSION "No such file|ModuleNotFoundError")

md_error_test(eval.fid_empty_folder "eval_cli/empty: no images \\(.png, .jpg, .jpeg, .webp\\) in the folder"
              eval fid --real ${MD_EVAL_DIR}/empty --fake ${MD_EVAL_DIR}/same --inception ${MD_EVAL_W})
md_error_test(eval.fid_missing_folder "/nonexistent: no such folder" eval fid --real /nonexistent --fake ${MD_EVAL_DIR}/same)
md_error_test(eval.fid_wrong_weights "text_misshaped_clip.safetensors: not an FID Inception-v3 weight file"
              eval fid --real ${MD_EVAL_DIR}/same --fake ${MD_EVAL_DIR}/same
              --inception ${MD_EVAL_DATA}/text_misshaped_clip.safetensors)
md_error_test(eval.fid_not_weights "fid_stats_a.npz: not a readable torch.save checkpoint"
              eval fid --real ${MD_EVAL_DIR}/same --fake ${MD_EVAL_DIR}/same --inception ${MD_EVAL_DATA}/fid_stats_a.npz)
md_error_test(eval.fid_stats_dimension "fid_stats_a.npz: statistics of dimension 64, the FID Inception gives 2048"
              eval fid --real ${MD_EVAL_DIR}/same --fake ${MD_EVAL_DATA}/fid_stats_a.npz --inception ${MD_EVAL_W})
md_error_test(eval.fid_not_stats "fid_features.npz: not FID statistics"
              eval fid --real ${MD_EVAL_DATA}/fid_features.npz --fake ${MD_EVAL_DATA}/fid_stats_a.npz)
md_error_test(eval.fid_no_inception "computing statistics of a folder needs --inception"
              eval fid --real ${MD_EVAL_DIR}/same --fake ${MD_EVAL_DIR}/same)
add_test(NAME eval.fid_mixed_sizes COMMAND ${CMAKE_COMMAND} -DBIN=$<TARGET_FILE:microdit>
         "-DARGS=eval|fid|--real|${MD_EVAL_DIR}/mixed|--fake|${MD_EVAL_DIR}/same|--inception|${MD_EVAL_W}"
         "-DREGEX=img_rgb.png: image is 61x47, the others 1x1 \\(images of one size needed\\)"
         -P ${CMAKE_CURRENT_SOURCE_DIR}/tests/expect_error.cmake)
set_tests_properties(eval.fid_mixed_sizes PROPERTIES FIXTURES_REQUIRED eval_fid SKIP_REGULAR_EXPRESSION "${MD_EVAL_SKIP}")
md_error_test(eval.clip_caption_count "has 8 captions for 3 images"
              eval clip-score --images ${MD_EVAL_DIR}/same --captions ${MD_EVAL_DATA}/fid_expected.json
              --clip ${MD_EVAL_DATA}/text_misshaped_clip.safetensors)
md_error_test(eval.clip_wrong_weights "not an open_clip CLIP checkpoint \\(no image tower"
              eval clip-score --images ${MD_EVAL_DIR}/mixed --captions ${MD_EVAL_DATA}/text_bad_utf8.txt
              --clip ${MD_EVAL_DATA}/text_misshaped_clip.safetensors)
md_error_test(eval.coco_few_captions "has 2 captions, --n asks for 30000"
              eval coco --ckpt /nonexistent.safetensors --captions ${MD_EVAL_DATA}/text_bad_utf8.txt
              --stats ${MD_EVAL_DATA}/fid_stats_a.npz --inception ${MD_EVAL_W} --clip x --out ${MD_EVAL_DIR}/coco)
md_error_test(eval.coco_stats_dimension "fid_stats_a.npz: statistics of dimension 64, the FID Inception gives 2048"
              eval coco --ckpt /nonexistent.safetensors --captions ${MD_EVAL_DATA}/text_bad_utf8.txt --n 2
              --stats ${MD_EVAL_DATA}/fid_stats_a.npz --inception ${MD_EVAL_W} --clip x --out ${MD_EVAL_DIR}/coco)
