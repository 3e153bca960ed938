#include "soak/soak.h"
