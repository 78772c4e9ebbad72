// safetensors files: 8-byte little-endian header length, JSON header, raw little-endian data.
#pragma once
#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace microdit {

using at::Tensor;

// Tensors in file order (header order is not guaranteed; we sort by data offset).
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

struct SafetensorsFile {
  NamedTensors tensors;
  std::map<std::string, std::string> metadata;  // the header's __metadata__
  const Tensor* find(const std::string& name) const;
  const Tensor& at(const std::string& name) const;  // throws Error naming the key
};

// Validates the header, every dtype, shape and byte range; throws microdit::Error naming the
// file and the problem for a missing, truncated or corrupt file.
// with_data = false validates the same header but reads no tensor data: `tensors` is empty
// (for metadata of large checkpoints).
SafetensorsFile read_safetensors(const std::string& path, bool with_data = true);

// Writes atomically (temporary file in the same folder, then rename). Tensors are saved
// contiguous, on the CPU, in their own dtype.
void write_safetensors(const std::string& path, const NamedTensors& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace microdit
