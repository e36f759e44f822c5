/// Growing the virtual disk.
extension QCowFile {
    /// Grows the virtual size to `newSize` (a multiple of 512; shrinking is refused).
    /// The new range reads as zeros, or from the backing file where that is longer,
    /// as after `qemu-img resize`. A bigger L1 table is written to new clusters, then
    /// the header switches to it, then the old one is freed.
    public func grow(to newSize: UInt64) throws {
        try checkWritable()
        guard newSize % 512 == 0, newSize >= virtualSize, newSize <= QCowHeader.Limits.maxVirtualSize else {
            throw QCowError(.invalidArgument, "new size \(newSize) must be a multiple of 512 and at least the current size \(virtualSize)",
                            path: filename)
        }
        let needed = (newSize + bytesPerL2 - 1) / bytesPerL2
        guard needed * 8 <= QCowHeader.Limits.maxL1Bytes else {
            throw QCowError(.invalidArgument, "new size \(newSize) needs an L1 table beyond QEMU's 32 MiB limit", path: filename)
        }
        try guarded {
            guard needed > UInt64(l1.count) else {
                try writeHeader(withSize(newSize, header))
                return
            }
            // Step 1: the new L1 table in new clusters, synced. A crash leaks it.
            let clusters = Int((needed * 8 + UInt64(clusterSize) - 1) / UInt64(clusterSize))
            let newOffset = try allocate(clusters) << UInt64(clusterBits)
            var entries = l1 + [UInt64](repeating: 0, count: Int(needed) - l1.count)
            var bytes = encodeTable(entries[...])
            bytes += [UInt8](repeating: 0, count: clusters * clusterSize - bytes.count)
            try device.writeBytes(bytes, at: newOffset)
            try commitRefcounts()
            try syncBarrier()
            // Step 2: switch the header (writeHeader syncs).
            let oldOffset = header.l1TableOffset
            let oldClusters = (Int(header.l1Size) * 8 + clusterSize - 1) / clusterSize
            var next = withSize(newSize, header)
            next.l1TableOffset = newOffset
            next.l1Size = UInt32(needed)
            try writeHeader(next)
            swap(&l1, &entries)
            metadataClusters = nil
            // Step 3: free the old table; a crash before this is written leaks it.
            if oldOffset != 0 {
                for i in 0..<UInt64(oldClusters) { try release(cluster: (oldOffset >> UInt64(clusterBits)) + i) }
            }
            try commitRefcounts()
        }
    }

    private func withSize(_ size: UInt64, _ h: QCowHeader) -> QCowHeader {
        var h = h
        h.size = size
        return h
    }
}
