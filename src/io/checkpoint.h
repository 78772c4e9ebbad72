// State dicts by name: read from safetensors or from PyTorch's torch.save zip format (the
// reference's released checkpoints and Composer checkpoints), load into a module strictly
// or with an allow-list, save to safetensors.
#pragma once
#include <torch/nn/module.h>

#include "io/safetensors.h"

namespace microdit {

// Reads every tensor of a checkpoint file. torch.save files may nest the state dict
// (Composer: state.model.dit.*; DDP: module.*): nested keys are joined with '.', and when
// `anchor` names a key, the prefix in front of it is found and stripped (shortest wins),
// keeping only the keys under that prefix.
NamedTensors read_checkpoint(const std::string& path,
                             const std::string& anchor = "x_embedder.proj.weight");

// The keys under the prefix in front of `anchor` (shortest wins), stripped of it; all keys
// when no key ends in the anchor.
NamedTensors under_anchor(NamedTensors all, const std::string& anchor = "x_embedder.proj.weight");

struct LoadOptions {
  // Patterns ('*' matches any run of characters) of keys that may be missing from the file
  // or present in the file without a place in the model. A mis-shaped key is always an error.
  std::vector<std::string> allow_missing, allow_unexpected;
  bool non_strict = false;  // allow any missing/unexpected key, as torch's strict=False
};

struct LoadReport {
  std::vector<std::string> missing, unexpected;  // those tolerated by the options
  size_t loaded = 0;
};

// Copies tensors into the module's parameters and buffers (converting dtype and device).
// Throws microdit::Error naming the first key that is missing, unexpected or mis-shaped.
LoadReport load_state_dict(torch::nn::Module& module, const NamedTensors& tensors,
                           const LoadOptions& options = {}, const std::string& source = "");

// Parameters then buffers, with the reference's dotted names.
NamedTensors state_dict(const torch::nn::Module& module);

bool glob_match(const std::string& pattern, const std::string& text);

}  // namespace microdit
