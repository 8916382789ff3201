#include "common.h"
notrace int fast(int x) { return sink(x - 1); }
