// PyTorch's legacy torch.save format (before 1.6, e.g. pytorch-fid's released
// pt_inception-2015-12-05-6726825d.pth): a pickle of the magic number, the protocol version,
// system info, the object (storages as persistent ids), the storage keys, then each storage
// as an int64 element count and its raw little-endian bytes. Reads state dicts (nested dicts
// of tensors; nested keys joined with '.'); anything else in the pickle is ignored.
#pragma once
#include <string>

#include "io/safetensors.h"

namespace microdit {

bool is_legacy_torch_file(const std::string& path);  // starts with pickle protocol 2
NamedTensors read_legacy_torch(const std::string& path);

}  // namespace microdit
