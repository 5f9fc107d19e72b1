// dino/data.hpp: data sets (IDX, CIFAR, image folders, arrays), multi-crop augmentation and
// the threaded loader. Kept out of dino/dino.hpp: it needs zlib and compiles stb_image.
#pragma once

#include "dino/data/array_dataset.hpp"
#include "dino/data/cifar.hpp"
#include "dino/data/idx.hpp"
#include "dino/data/image.hpp"
#include "dino/data/image_folder.hpp"
#include "dino/data/loader.hpp"
#include "dino/data/multicrop.hpp"
