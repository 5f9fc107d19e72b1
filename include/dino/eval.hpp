// dino/eval.hpp: evaluation: weighted k-NN, the linear probe, attention maps and masks, and
// their PNG pictures (needs libstb-dev's stb_image_write).
#pragma once

#include "dino/eval/attention.hpp"
#include "dino/eval/attention_png.hpp"
#include "dino/eval/knn.hpp"
#include "dino/eval/linear_probe.hpp"
#include "dino/io/plot.hpp"
#include "dino/io/png.hpp"
