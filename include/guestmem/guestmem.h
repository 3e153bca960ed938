// The whole public API of guestmem in one include.
#ifndef GUESTMEM_GUESTMEM_H_
#define GUESTMEM_GUESTMEM_H_

#include "guestmem/address.h"
#include "guestmem/mapping.h"
#include "guestmem/os.h"
#include "guestmem/page_state.h"
#include "guestmem/result.h"
#include "guestmem/unique_fd.h"

#endif  // GUESTMEM_GUESTMEM_H_
