# encode-text at the CLI: token ids, embeddings, and one-line errors for bad input.
# Tests that need the MiniLM / CLIP assets from scripts/setup.sh skip (ctest "Skipped") without them.
set(MD_TEXT_DATA "${CMAKE_CURRENT_SOURCE_DIR}/tests/data")
set(MD_TEXT_SKIP "assets not found|vocabulary file not found")

add_test(NAME text.ids_minilm COMMAND microdit encode-text --text "A photo of a cat." --ids --length 12)
set_tests_properties(text.ids_minilm PROPERTIES PASS_REGULAR_EXPRESSION
  "^101 1037 6302 1997 1037 4937 1012 102 0 0 0 0\n$" SKIP_REGULAR_EXPRESSION "${MD_TEXT_SKIP}")
add_test(NAME text.ids_clip COMMAND microdit encode-text --encoder clip-vit-h-14:random
         --text "A photo of a cat." --ids)
set_tests_properties(text.ids_clip PROPERTIES PASS_REGULAR_EXPRESSION
  "^49406 320 1125 539 320 2368 269 49407 0 0" SKIP_REGULAR_EXPRESSION "${MD_TEXT_SKIP}")
add_test(NAME text.embed_minilm COMMAND microdit encode-text --text "a red fox" --text "")
set_tests_properties(text.embed_minilm PROPERTIES PASS_REGULAR_EXPRESSION "shape: \\(2, 77, 384\\)"
  SKIP_REGULAR_EXPRESSION "${MD_TEXT_SKIP}")

md_error_test(text.bad_utf8 "text_bad_utf8.txt line 2 is not valid UTF-8 \\(byte 0xff at offset 4\\)"
              encode-text --captions ${MD_TEXT_DATA}/text_bad_utf8.txt)
md_error_test(text.missing_vocab "WordPiece vocabulary file not found: .*tests/data/vocab.txt"
              encode-text --encoder ${MD_TEXT_DATA} --text hi)
md_error_test(text.misshaped_weights "key '(positional_embedding|token_embedding.weight)' has shape .* but the model expects"
              encode-text --encoder clip-vit-h-14:${MD_TEXT_DATA}/text_misshaped_clip.safetensors --text hi)
md_error_test(text.unknown_encoder "unknown text encoder 'nope'" encode-text --encoder nope --text hi)
