# microdit prepare in latent mode (images + captions -> the reference's latent MDS): one-line
# errors for bad input. The end-to-end runs (resume, corrupt inputs, mosaicml-streaming reading
# the output) are GoogleTest cases in tests/test_prepare_latents.cpp.
