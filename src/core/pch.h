// Precompiled header for every target: the heavy LibTorch headers, parsed once.
// Sources still include what they use; this file only makes the build quick.
#pragma once
#include <torch/torch.h>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
