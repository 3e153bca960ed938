// The whole public API of guestmem in one include.
#ifndef GUESTMEM_GUESTMEM_H_
#define GUESTMEM_GUESTMEM_H_

#include "guestmem/address.h"
#include "guestmem/address_registry.h"
#include "guestmem/content_fetcher.h"
#include "guestmem/event_sequencer.h"
#include "guestmem/fault_engine.h"
#include "guestmem/fault_handler.h"
#include "guestmem/fault_stats.h"
#include "guestmem/guest_layout.h"
#include "guestmem/handshake.h"
#include "guestmem/install_policy.h"
#include "guestmem/log.h"
#include "guestmem/mapping.h"
#include "guestmem/memory_file.h"
#include "guestmem/os.h"
#include "guestmem/page_installer.h"
#include "guestmem/page_source.h"
#include "guestmem/page_state.h"
#include "guestmem/page_tracker.h"
#include "guestmem/result.h"
#include "guestmem/uffd_modes.h"
#include "guestmem/unique_fd.h"
#include "guestmem/unix_socket.h"
#include "guestmem/userfault_bitmap.h"
#include "guestmem/userfaultfd.h"

#endif  // GUESTMEM_GUESTMEM_H_
