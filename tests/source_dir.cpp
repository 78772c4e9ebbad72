// The checkout's path, for the tests that read tests/data, configs/ and the project's .venv.
// Only this file is compiled with the path (a macro from CMake), and it includes no header, so
// every other object is the same in any clone and ccache shares them between clones.
namespace microdit::test_util {
const char* source_dir() { return MICRODIT_SOURCE_DIR; }
}  // namespace microdit::test_util
