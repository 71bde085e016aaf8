// The DCLS version argument of every DCLS op, parsed once (torch layer).
#pragma once
#include <torch/library.h>

#include <string>

#include "dcls/params.h"

namespace trous {
namespace dcls {

inline Version parse_version(c10::string_view name, const char* op) {
  for (int i = 0; i < 4; ++i)
    if (name == kVersionNames[i]) return static_cast<Version>(i);
  TORCH_CHECK(false, op, ": version must be one of ", kVersionList, ", got \"", std::string(name), "\"");
}

}  // namespace dcls
}  // namespace trous
