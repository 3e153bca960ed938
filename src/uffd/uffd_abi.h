// The userfaultfd kernel ABI: <linux/userfaultfd.h> completed with what older installed uapi
// headers lack (the POISON and MOVE ioctls, the newest feature bits, the /dev/userfaultfd ioctl).
// Values are the kernel's own; every definition is guarded so that newer headers win. Whether the
// running kernel implements any of it is probed at run time (UFFDIO_API), never assumed.
//
// Thread safety: constants and plain structs only.
#ifndef GUESTMEM_UFFD_UFFD_ABI_H_
#define GUESTMEM_UFFD_UFFD_ABI_H_

#include <linux/types.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>

// /dev/userfaultfd (Linux 6.1): an ioctl on the device returns a new uffd.
#ifndef USERFAULTFD_IOC
#define USERFAULTFD_IOC 0xAA
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(USERFAULTFD_IOC, 0x00)
#endif

// Creation flag (Linux 5.11): only faults taken in user mode trap.
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON (1 << 14)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
#endif

#ifndef _UFFDIO_MOVE
#define _UFFDIO_MOVE (0x05)  // NOLINT(bugprone-reserved-identifier): the kernel's name
#endif
#ifndef _UFFDIO_POISON
#define _UFFDIO_POISON (0x08)  // NOLINT(bugprone-reserved-identifier): the kernel's name
#endif

// UFFDIO_POISON (Linux 6.6): marks a range so that touching it raises SIGBUS.
#ifndef UFFDIO_POISON
struct uffdio_poison {
  struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE (1ULL << 0)
  __u64 mode;
  __s64 updated;  // written by the kernel: bytes poisoned, or -errno
};
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

// UFFDIO_MOVE (Linux 6.8): moves anonymous pages from src to dst without copying.
#ifndef UFFDIO_MOVE
struct uffdio_move {
  __u64 dst;
  __u64 src;
  __u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE (1ULL << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES (1ULL << 1)
  __u64 mode;
  __s64 move;  // written by the kernel: bytes moved, or -errno
};
#define UFFDIO_MOVE _IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)
#endif

#endif  // GUESTMEM_UFFD_UFFD_ABI_H_
