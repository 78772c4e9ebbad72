// microdit: thin command-line entry point. Every user error ends as one line on stderr and
// a non-zero exit; the work lives in the library.
#include <c10/util/Exception.h>

#include <iostream>

#include "cli/commands.h"
#include "core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"microdit: train and sample MicroDiT text-to-image diffusion transformers"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "microdit 0.1.0");
  microdit::cli::register_info(app);
  microdit::cli::register_parity(app);
  microdit::cli::register_convert(app);
  microdit::cli::register_bench(app);
  microdit::cli::register_prepare(app);
  microdit::cli::register_train(app);
  microdit::cli::register_bench_dist(app);
  microdit::cli::register_sample(app);
  microdit::cli::register_serve(app);
  microdit::cli::register_dataset(app);
  microdit::cli::register_encode_text(app);
  microdit::cli::register_eval_colour(app);
  microdit::cli::register_eval_recall(app);
  microdit::cli::register_eval(app);
  microdit::cli::register_vae(app);
  microdit::cli::register_vae_init(*app.get_subcommand("vae"));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const microdit::Error& e) {
    std::fflush(stdout);
    std::cerr << "microdit: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    std::cerr << "microdit: error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "microdit: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
