// MARK: - Mapping guest offsets

extension QCowFile {
    /// The L2 table at `offset`, from the cache or the file (entries as native
    /// integers; extended L2 tables hold entry/bitmap pairs).
    func l2Table(at offset: UInt64, l1Index: Int = -1) throws -> [UInt64] {
        if let table = l2Cache[offset] { return table }
        try validateL2Reference(offset, l1Index: l1Index)
        let table = decodeTable(try device.readBytes(clusterSize, at: offset, region: "L2 table"))
        l2Cache[offset] = table
        return table
    }

    /// Decodes one L2 entry with the image's geometry (see `L2Cluster`).
    @inline(__always)
    func decodeL2(entry raw: UInt64, bitmap: UInt64) -> L2Cluster {
        L2Cluster(entry: raw, bitmap: bitmap, clusterBits: clusterBits, extendedL2: extendedL2,
                  externalDataFile: header.incompatibleFeatures.contains(.externalDataFile))
    }

    /// Classifies one L2 entry (and subcluster `sub` for extended L2) for the guest
    /// data paths: what `L2Cluster` decodes, refused where reading or writing
    /// through it would be wrong (an invalid subcluster bitmap, an unaligned host
    /// offset, a host range past the end of the file). `entryOffset` is where the
    /// entry lives, for messages.
    public func classify(entry raw: UInt64, bitmap: UInt64, subcluster sub: Int, entryOffset: UInt64) throws
        -> ClusterMapping
    {
        try validatedMapping(decodeL2(entry: raw, bitmap: bitmap), subcluster: sub, entryOffset: entryOffset)
    }

    /// `cluster`'s mapping for subcluster `sub`, after the checks `classify` describes.
    func validatedMapping(_ cluster: L2Cluster, subcluster sub: Int, entryOffset: UInt64) throws -> ClusterMapping {
        if case .compressed(let host, _) = cluster.kind {
            guard try isInsideFile(host, length: 1, data: true) else {
                throw QCowError(.corrupt, "compressed cluster at 0x\(String(host, radix: 16)) lies past the end of the file",
                                path: filename, offset: entryOffset, region: "L2 table")
            }
        }
        if let invalid = cluster.invalidBitmap {
            let message: String
            switch invalid {
            case .allocatedAndZero(let mask):
                message = "subclusters marked both allocated and zero (0x\(String(mask, radix: 16)))"
            default:
                message = "subclusters are allocated but the cluster has no host offset"
            }
            throw QCowError(.corrupt, message, path: filename, offset: entryOffset + 8, region: "L2 table")
        }
        if let host = cluster.host, host != 0 {
            guard !cluster.unalignedHost else {
                throw QCowError(.corrupt, "cluster offset 0x\(String(host, radix: 16)) is not cluster aligned",
                                path: filename, offset: entryOffset, region: "L2 table")
            }
            guard try header.incompatibleFeatures.contains(.externalDataFile) || isInsideFile(host, length: 1, data: true)
            else {
                throw QCowError(.corrupt, "data cluster at 0x\(String(host, radix: 16)) lies past the end of the file",
                                path: filename, offset: entryOffset, region: "L2 table")
            }
        }
        return cluster.mapping(unit: sub, unitSize: subclusterSize)
    }

    public func layerStatus(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent {
        try layerStatus(at: offset, maxLength: maxLength, l1Table: l1)
    }

    /// Walks L1/L2 from `offset`, merging (sub)clusters that continue one another, up to `maxLength`.
    func layerStatus(at offset: UInt64, maxLength: UInt64, l1Table: [UInt64]) throws -> LayerExtent {
        let end = offset + min(maxLength, virtualSize > offset ? virtualSize - offset : maxLength)
        let unit = UInt64(subclusterSize)
        // Properties read once: each read of a stored property of this class in the loop
        // below is a dynamic exclusivity check.
        let extendedL2 = self.extendedL2
        let clusterBits = self.clusterBits
        let clusterSize = self.clusterSize
        let tableBits = UInt64(clusterBits + l2Bits)
        let entryMask = UInt64(l2EntryCount - 1)
        let entrySize = header.l2EntrySize
        let lead = offsetIntoUnit(offset)
        var first: ClusterMapping?
        // Unallocated subclusters of an allocated cluster keep their would-be host offset.
        var firstUnallocatedHost: UInt64?
        var length: UInt64 = 0
        var pos = offset
        func result() -> LayerExtent {
            LayerExtent(length: length, mapping: shifted(first ?? .unallocated, by: lead),
                        unallocatedHost: firstUnallocatedHost.map { $0 + lead })
        }
        while pos < end {
            let l1Index = Int(pos >> tableBits)
            let l2Raw = l1Index < l1Table.count ? L1Entry(rawValue: l1Table[l1Index]).l2Offset : 0
            let tableEnd = min(end, (UInt64(l1Index) + 1) << tableBits)
            if l2Raw == 0 {
                // No L2 table: everything it would cover is unallocated.
                if let first, first != .unallocated || firstUnallocatedHost != nil { break }
                first = .unallocated
                length += tableEnd - pos
                pos = tableEnd
                continue
            }
            let table = try l2Table(at: l2Raw, l1Index: l1Index)
            while pos < end && pos < tableEnd {
                let index = Int((pos >> UInt64(clusterBits)) & entryMask)
                let entryOffset = l2Raw + UInt64(index * entrySize)
                let raw = extendedL2 ? table[2 * index] : table[index]
                let bitmap = extendedL2 ? table[2 * index + 1] : 0
                let sub = extendedL2 ? Int((pos & UInt64(clusterSize - 1)) / unit) : 0
                let cluster = decodeL2(entry: raw, bitmap: bitmap)
                let mapping = try validatedMapping(cluster, subcluster: sub, entryOffset: entryOffset)
                var unallocatedHost: UInt64?
                if mapping == .unallocated, cluster.kind == .normal, let host = cluster.host {
                    unallocatedHost = host + UInt64(sub) * unit
                }
                let unitStart = extendedL2 ? pos & ~(unit - 1) : pos & ~UInt64(clusterSize - 1)
                let unitEnd = unitStart + (extendedL2 ? unit : UInt64(clusterSize))
                if let first {
                    let distance = pos - offset + lead
                    let hostsContinue: Bool
                    switch (firstUnallocatedHost, unallocatedHost) {
                    case (nil, nil): hostsContinue = true
                    case (let a?, let b?): hostsContinue = b == a + distance
                    default: hostsContinue = false
                    }
                    guard hostsContinue, first.continues(mapping, after: distance) else { return result() }
                } else {
                    first = mapping
                    firstUnallocatedHost = unallocatedHost
                }
                let take = min(unitEnd, end) - pos
                length += take
                pos += take
                // Data in a compressed cluster never merges with the next cluster.
                if case .compressed = mapping { return result() }
            }
        }
        return result()
    }

    /// Host offsets in mappings are of the unit start; callers want the byte at `offset`.
    @inline(__always) private func shifted(_ mapping: ClusterMapping, by delta: UInt64) -> ClusterMapping {
        switch mapping {
        case .data(let host): return .data(host: host + delta)
        case .zero(let host?): return .zero(host: host + delta)
        default: return mapping
        }
    }

    /// Adjust for a first mapping that starts mid-unit: host offsets are of the unit start.
    @inline(__always) private func offsetIntoUnit(_ offset: UInt64) -> UInt64 {
        offset & UInt64(subclusterSize - 1)
    }
}

// MARK: - Reading guest data

extension QCowFile {
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buffer.count {
            let pos = offset + UInt64(done)
            let want = buffer.count - done
            let out = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + want)])
            if pos >= virtualSize {
                out.initializeMemory(as: UInt8.self, repeating: 0)
                return
            }
            let ext = try layerStatus(at: pos, maxLength: UInt64(want))
            let n = Int(ext.length)
            let part = UnsafeMutableRawBufferPointer(rebasing: out[0..<n])
            switch ext.mapping {
            case .data(let host):
                try dataDevice.readZeroFilling(into: part, at: host)
            case .zero:
                part.initializeMemory(as: UInt8.self, repeating: 0)
            case .compressed(let host, let length):
                try withDecompressedCluster(host: host, length: length) { cluster in
                    let start = Int(pos & UInt64(clusterSize - 1))
                    part.copyMemory(from: UnsafeRawBufferPointer(rebasing: cluster[start..<(start + n)]))
                }
            case .unallocated:
                try readBacking(into: part, at: pos)
            }
            done += n
        }
    }

    /// Reads from the backing chain; past its end (or with none) reads zeros.
    func readBacking(into part: UnsafeMutableRawBufferPointer, at pos: UInt64) throws {
        guard let backing, pos < backing.virtualSize else {
            part.initializeMemory(as: UInt8.self, repeating: 0)
            return
        }
        let inside = Int(min(UInt64(part.count), backing.virtualSize - pos))
        try backing.read(into: UnsafeMutableRawBufferPointer(rebasing: part[0..<inside]), at: pos)
        if inside < part.count {
            UnsafeMutableRawBufferPointer(rebasing: part[inside...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Decompresses the cluster at `host` (cached: the last one stays).
    public func withDecompressedCluster<T>(host: UInt64, length: Int, _ body: (UnsafeRawBufferPointer) throws -> T) throws -> T {
        if decompressedHost != host {
            var input = [UInt8](repeating: 0, count: length)
            try input.withUnsafeMutableBytes { try dataDevice.readZeroFilling(into: $0, at: host) }
            if decompressed.count != clusterSize { decompressed = [UInt8](repeating: 0, count: clusterSize) }
            let codec = ClusterCodec(header.compression)
            let ok = input.withUnsafeBytes { inp in
                decompressed.withUnsafeMutableBytes { codec.decompress(inp, into: $0) }
            }
            guard ok else {
                decompressedHost = nil
                throw QCowError(.corrupt, "compressed cluster at 0x\(String(host, radix: 16)) does not decompress (\(header.compression.name))",
                                path: filename, offset: host, region: "compressed cluster")
            }
            decompressedHost = host
        }
        return try decompressed.withUnsafeBytes { try body($0) }
    }
}
