// The CLI's commands, as library functions (src/cli/main.cpp only wires them to CLI11).
#pragma once
#include <CLI/CLI.hpp>

namespace microdit::cli {

// Adds --device and --threads to a subcommand; the values land in the returned struct.
struct RuntimeOptions {
  std::string device = "auto";
  int threads = 0;
};
void add_runtime_options(CLI::App& cmd, RuntimeOptions& rt);

// --precision auto|bf16|fp32 of the commands that sample (sample, serve, eval-colour,
// eval-recall, eval coco); core/precision.h sampling_bf16 reads the value.
void add_precision_option(CLI::App& cmd, std::string& precision);

void register_info(CLI::App& app);
void register_parity(CLI::App& app);
void register_convert(CLI::App& app);
void register_bench(CLI::App& app);
void register_prepare(CLI::App& app);
void register_train(CLI::App& app);
void register_bench_dist(CLI::App& app);
void register_sample(CLI::App& app);
void register_serve(CLI::App& app);
void register_dataset(CLI::App& app);
void register_encode_text(CLI::App& app);
void register_eval_colour(CLI::App& app);
void register_eval_recall(CLI::App& app);
void register_eval(CLI::App& app);  // eval fid | clip-score | coco
void register_vae(CLI::App& app);
void register_vae_init(CLI::App& vae);  // `vae init`, under the vae command

}  // namespace microdit::cli
