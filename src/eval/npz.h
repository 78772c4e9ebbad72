// NumPy's .npy arrays and .npz archives (a zip of NAME.npy members), as pytorch-fid stores
// FID statistics (mu: (D,) float64, sigma: (D, D) float64). Reads what np.save / np.savez /
// np.savez_compressed write (npy format 1.0-3.0, little-endian f2/f4/f8/i1-i8/u1/b1, C or
// Fortran order; zip entries stored or deflated, zip64 records); writes npy 1.0 and a stored
// (uncompressed) zip, as np.savez does, atomically.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace microdit {

using NpzArrays = std::vector<std::pair<std::string, at::Tensor>>;  // names without ".npy"

// Parses one .npy file held in memory; errors name `where`.
at::Tensor parse_npy(const std::string& bytes, const std::string& where);
// The .npy bytes of a CPU tensor (any dtype NumPy has; written contiguous, C order).
std::string to_npy(const at::Tensor& t);

NpzArrays read_npz(const std::string& path);
void write_npz(const std::string& path, const NpzArrays& arrays);

}  // namespace microdit
