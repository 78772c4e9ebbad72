// Parity against vectors computed by the reference implementation (shared/reference format):
// builds the model from the file's metadata, loads its weights, recomputes every `out.*` and
// `grad.*` present and reports the relative error of each against its tolerance.
#pragma once
#include <c10/core/Device.h>

#include <map>
#include <string>
#include <vector>

#include "model/config.h"

namespace microdit {

struct ParityRow {
  std::string key;
  double error = 0;      // ||ours - ref|| / ||ref|| (0/1 mismatch count for index tensors)
  double tolerance = 0;
  bool checked = true;   // false: an output this tool does not know how to compute
  bool pass() const { return !checked || error <= tolerance; }
};

struct ParityReport {
  ModelConfig config;
  std::map<std::string, std::string> metadata;
  std::vector<ParityRow> rows;
  bool ok() const;
};

// The reference DiT constructor's arguments from the metadata, missing ones at the
// constructor's defaults.
ModelConfig config_from_parity_metadata(const std::map<std::string, std::string>& meta);

// cuda_graph: the sampler output through the CUDA-graph sampler (SamplerOptions::cuda_graph).
ParityReport run_parity(const std::string& path, const c10::Device& device, bool cuda_graph = false);

double relative_error(const at::Tensor& ours, const at::Tensor& ref);

}  // namespace microdit
