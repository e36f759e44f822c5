/// Compressed cluster writes: deflate or zstd (the image's compression_type),
/// packed byte by byte into shared host clusters as QEMU's qcow2_alloc_bytes
/// does. Every host cluster a compressed descriptor's sectors touch holds one
/// reference for it — qcow2.rst, "Compressed Clusters Descriptor".
extension QCowFile {
    /// Writes one guest cluster compressed. `offset` is cluster aligned; `cluster`
    /// holds `cluster_size` bytes, or (for the last cluster of a disk whose size is
    /// not a multiple of it) the bytes up to the end of the disk. Data that does
    /// not compress smaller than a cluster is written uncompressed.
    public func writeCompressed(cluster data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkWritable()
        let cs = clusterSize
        guard isClusterAligned(offset), offset < virtualSize,
              data.count == cs || (data.count < cs && UInt64(data.count) == virtualSize - offset)
        else {
            throw QCowError(.invalidArgument, "a compressed write takes one whole cluster at a cluster-aligned offset (got \(data.count) bytes at 0x\(String(offset, radix: 16)))",
                            path: filename)
        }
        writeObserver?(offset..<(offset + UInt64(data.count)), .data)
        try guarded {
            decompressedHost = nil
            let buffer = scratch.reserve(2 * cs)
            let input = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<cs])
            input.copyMemory(from: data)
            if data.count < cs {
                UnsafeMutableRawBufferPointer(rebasing: input[data.count...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
            let output = UnsafeMutableRawBufferPointer(rebasing: buffer[cs..<(2 * cs)])
            guard let n = ClusterCodec(header.compression).compress(UnsafeRawBufferPointer(input), into: output), n > 0 else {
                // Incompressible: an ordinary write (from a copy: the batch reuses the scratch buffer).
                let copy = [UInt8](data)
                var hosts: Set<UInt64> = []
                try copy.withUnsafeBytes { try writeBatch($0, at: offset, hosts: &hosts) }
                return
            }
            try storeCompressed(UnsafeRawBufferPointer(rebasing: output[0..<n]), at: offset)
        }
    }

    /// Writes one guest cluster from data the caller already compressed with the
    /// image's codec (`ClusterCodec(header.compression)`), e.g. on several threads.
    /// `compressed` must be smaller than a cluster; `offset` is cluster aligned.
    public func writePrecompressed(_ compressed: UnsafeRawBufferPointer, at offset: UInt64, guestLength: Int) throws {
        try checkWritable()
        guard isClusterAligned(offset), offset < virtualSize, compressed.count > 0, compressed.count < clusterSize else {
            throw QCowError(.invalidArgument, "a precompressed write takes under one cluster of data at a cluster-aligned offset",
                            path: filename)
        }
        writeObserver?(offset..<(offset + UInt64(guestLength)), .data)
        try guarded {
            decompressedHost = nil
            try storeCompressed(compressed, at: offset)
        }
    }

    /// Packs compressed bytes into the file and points the cluster's L2 entry at them.
    func storeCompressed(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let n = data.count
        let l1Index = Int(offset / bytesPerL2)
        let l2Offset = try writableL2(l1Index: l1Index)
        let host = try allocateBytes(n)
        try checkDataOverlap(host: host, length: n)
        try dataDevice.write(data, at: host)
        noteFileEnd(host + UInt64(n))
        let sectors = Int(((host + UInt64(n) - 1) >> 9) - (host >> 9)) + 1
        let entry = L2Entry.compressed(host: host, sectors: sectors, clusterBits: clusterBits).rawValue
        var table = try l2Table(at: l2Offset)
        let index = Int((offset >> UInt64(clusterBits)) & UInt64(l2EntryCount - 1))
        let perEntry = extendedL2 ? 2 : 1
        let old = table[perEntry * index]
        table[perEntry * index] = entry
        if extendedL2 { table[2 * index + 1] = 0 }
        try switchEntries(l2Offset: l2Offset, table: table, changed: index...index, release: [old])
    }

    /// Reserves `count` bytes (less than a cluster) for compressed data, after the
    /// previous compressed cluster when it fits, and takes the references for them.
    func allocateBytes(_ count: Int) throws -> UInt64 {
        let table = try refcounts()
        let cs = UInt64(clusterSize)
        let bits = UInt64(clusterBits)
        if let tail = compressedTail, tail & (cs - 1) != 0 {
            let cluster = tail >> bits
            let room = cs - (tail & (cs - 1))
            if UInt64(count) <= room {
                if try table.get(cluster) < table.maxValue {
                    _ = try table.adjust(cluster, by: 1)
                    compressedTail = tail + UInt64(count)
                    return tail
                }
            } else {
                let next = try allocate(1)
                if next == cluster + 1, try table.get(cluster) < table.maxValue {
                    _ = try table.adjust(cluster, by: 1)
                    compressedTail = tail + UInt64(count)
                    return tail
                }
                compressedTail = (next << bits) + UInt64(count)
                return next << bits
            }
        }
        let fresh = try allocate(1) << bits
        compressedTail = fresh + UInt64(count)
        return fresh
    }
}
