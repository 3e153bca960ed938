// Moving packed snapshots between local disk and an object store (object_store.h).
//
// PushSnapshot uploads a packed snapshot and the layers below it. Its chunks go to a chunk store
// in the object store — the object store/ab/<hash> for each, as a ChunkStore lays them out — so
// that the snapshots of one template pushed to one store share the chunks they have in common:
// only chunks the store does not have yet are uploaded (a HEAD tells). Each layer then becomes an
// object of its own, its header and index only, every chunk named as in that store; a layer's
// parent goes where its relative name points from the layer's object, as it does on disk. Chunks
// go first and a layer's object after its parent's, so that a reader never finds a pack whose
// chunks or parent are not there yet.
//
// PullSnapshot does the reverse: each layer's object is written to the local path its relative
// name points to, and its chunks into the local chunk store it names, but for those the store
// holds whole already.
//
// Thread safety: the functions may be called from many threads at once.
#ifndef GUESTMEM_SNAPSHOT_TRANSFER_H_
#define GUESTMEM_SNAPSHOT_TRANSFER_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "guestmem/object_store.h"
#include "guestmem/result.h"

namespace guestmem {

struct TransferOptions {
  // push: the chunk store, relative to the snapshot's object (default: "chunks" beside it).
  std::string store = "chunks";
  unsigned threads = 8;  // chunks moved at once
  // Called after each chunk, with chunks done and chunks in all.
  std::function<void(uint64_t done, uint64_t total)> progress;
};

struct TransferSummary {
  std::vector<std::string> layers;  // the objects (push) or files (pull) written, top first
  uint64_t chunks = 0;              // chunks the snapshot's layers name, shared ones once
  uint64_t chunks_moved = 0;        // of them, uploaded or downloaded
  uint64_t bytes_moved = 0;         // their bytes, and the layers'
};

// ERRORS: those of opening the snapshot (packed_source.h) and of the store's requests; a chunk
// that does not match its hash is kDataLoss and nothing of its layer is uploaded.
Result<TransferSummary> PushSnapshot(const std::string& snapshot, const ObjectUrl& to,
                                     const ObjectStore& store, const TransferOptions& options = {});
// ERRORS: those of the store's requests, kDataLoss for a layer that is not a whole packed
// snapshot or a chunk that does not match its hash, and the PosixError of writing.
Result<TransferSummary> PullSnapshot(const ObjectUrl& from, const std::string& snapshot,
                                     const ObjectStore& store, const TransferOptions& options = {});

}  // namespace guestmem

#endif  // GUESTMEM_SNAPSHOT_TRANSFER_H_
