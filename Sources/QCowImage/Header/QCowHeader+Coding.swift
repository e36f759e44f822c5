// MARK: - Decoding

extension QCowHeader {
    /// QEMU's limits, enforced before anything is allocated from a header field.
    public enum Limits {
        public static let minClusterBits: UInt32 = 9
        public static let maxClusterBits: UInt32 = 21
        public static let maxL1Bytes: UInt64 = 32 << 20
        public static let maxRefcountTableBytes: UInt64 = 8 << 20
        public static let maxSnapshots: UInt32 = 65536
        public static let maxBackingNameLength = 1023
        /// QEMU refuses virtual sizes above 2^61 (QCOW_MAX_... / INT64 sector math).
        public static let maxVirtualSize: UInt64 = 1 << 61
    }

    /// Decodes the header, its extensions and the backing file name from the
    /// first bytes of the file (at least the first cluster, or the whole file
    /// if it is shorter). Checks only what decoding needs; `validate` does the rest.
    public init(decoding bytes: [UInt8]) throws {
        var r = ByteReader(bytes, region: "header")
        let magic = try r.u32()
        guard magic == Self.magic else {
            throw QCowError(.invalidFormat, "not a qcow2 image (magic is 0x\(String(magic, radix: 16)), expected 0x514649fb)",
                            offset: 0, region: "header")
        }
        version = try r.u32()
        guard version == 2 || version == 3 else {
            throw QCowError(.unsupported, "unsupported qcow2 version \(version)", offset: 4, region: "header")
        }
        backingFileOffset = try r.u64()
        backingFileSize = try r.u32()
        clusterBits = try r.u32()
        size = try r.u64()
        cryptMethod = try r.u32()
        l1Size = try r.u32()
        l1TableOffset = try r.u64()
        refcountTableOffset = try r.u64()
        refcountTableClusters = try r.u32()
        nbSnapshots = try r.u32()
        snapshotsOffset = try r.u64()
        compressionType = 0
        unknownHeaderBytes = []
        if version == 2 {
            incompatibleFeatures = []
            compatibleFeatures = []
            autoclearFeatures = []
            refcountOrder = 4
            headerLength = UInt32(Self.v2Length)
        } else {
            incompatibleFeatures = IncompatibleFeatures(rawValue: try r.u64())
            compatibleFeatures = CompatibleFeatures(rawValue: try r.u64())
            autoclearFeatures = AutoclearFeatures(rawValue: try r.u64())
            refcountOrder = try r.u32()
            headerLength = try r.u32()
            guard headerLength >= UInt32(Self.v3Length) else {
                throw QCowError(.invalidFormat, "header_length \(headerLength) is invalid (at least 104)",
                                offset: 100, region: "header")
            }
            guard Int(headerLength) <= bytes.count else {
                throw QCowError(.truncated, "header_length \(headerLength) runs past the end of the file",
                                offset: 100, region: "header")
            }
            if headerLength > 104 {
                compressionType = try r.u8(at: 104)
            }
            if headerLength > 112 {
                unknownHeaderBytes = try r.bytes(Int(headerLength) - 112, at: 112)
            }
        }
        guard clusterBits >= Limits.minClusterBits, clusterBits <= Limits.maxClusterBits else {
            throw QCowError(.invalidFormat, "cluster_bits \(clusterBits) is out of range (9 to 21)",
                            offset: 20, region: "header")
        }
        let clusterSize = 1 << Int(clusterBits)
        guard Int(headerLength) <= clusterSize else {
            throw QCowError(.invalidFormat, "header_length \(headerLength) exceeds the cluster size",
                            offset: 100, region: "header")
        }

        // Header extensions: from header_length up to the end of the first cluster.
        extensions = []
        let extensionEnd = min(bytes.count, clusterSize)
        var pos = Int(headerLength)
        while true {
            if pos == extensionEnd && version == 2 { break }
            guard pos + 8 <= extensionEnd else {
                throw QCowError(.truncated, "header extension at \(pos) runs past the first cluster",
                                offset: UInt64(pos), region: "header extension")
            }
            let type = try r.u32(at: pos)
            let length = Int(try r.u32(at: pos + 4))
            if type == HeaderExtension.end { break }
            let padded = (length + 7) & ~7
            guard length <= extensionEnd - pos - 8, padded <= extensionEnd - pos - 8 else {
                throw QCowError(.truncated,
                                "header extension 0x\(String(type, radix: 16)) of length \(length) runs past the first cluster",
                                offset: UInt64(pos), region: "header extension")
            }
            extensions.append(HeaderExtension(type: type, data: try r.bytes(length, at: pos + 8)))
            pos += 8 + padded
        }

        if backingFileOffset != 0 {
            guard backingFileSize > 0, Int(backingFileSize) <= Limits.maxBackingNameLength else {
                throw QCowError(.invalidFormat, "backing_file_size \(backingFileSize) is invalid (1 to 1023)",
                                offset: 16, region: "header")
            }
            guard backingFileOffset < UInt64(clusterSize),
                  Int(backingFileOffset) + Int(backingFileSize) <= min(bytes.count, clusterSize)
            else {
                throw QCowError(.truncated, "backing file name lies outside the first cluster",
                                offset: backingFileOffset, region: "backing file name")
            }
            let name = try r.bytes(Int(backingFileSize), at: Int(backingFileOffset))
            backingFile = String(decoding: name, as: UTF8.self)
        } else {
            backingFile = nil
        }
    }

    /// Checks every header field against the spec, QEMU's limits and the file size.
    /// `forCheck` accepts a missing refcount table (refcount_table_clusters 0), which
    /// `check --repair all` rebuilds, as QEMU opens such an image for qemu-img check only.
    public func validate(fileSize: UInt64, forCheck: Bool = false) throws {
        let clusterSize = UInt64(self.clusterSize)
        func fail(_ message: String, _ offset: UInt64, _ code: QCowError.Code = .invalidFormat) -> QCowError {
            QCowError(code, message, offset: offset, region: "header")
        }
        if cryptMethod != 0 {
            throw fail("encrypted images are not supported (crypt_method \(cryptMethod)\(cryptMethod == 1 ? ", AES" : cryptMethod == 2 ? ", LUKS" : ""))",
                       32, .unsupported)
        }
        let unknown = incompatibleFeatures.subtracting(.known)
        if !unknown.isEmpty {
            let bits = (0..<64).filter { unknown.rawValue & (1 << UInt64($0)) != 0 }
            let names = bits.map { featureName(kind: .incompatible, bit: $0) }
            throw fail("unsupported incompatible feature: \(names.joined(separator: ", "))", 72, .unsupported)
        }
        if version == 3 {
            guard refcountOrder <= 6 else { throw fail("refcount_order \(refcountOrder) is out of range (0 to 6)", 96) }
        }
        if compressionType > 1 {
            throw fail("unknown compression_type \(compressionType)", 104, .unsupported)
        }
        if compressionType == 0 && incompatibleFeatures.contains(.compressionType) {
            throw fail("the compression type incompatible bit is set but compression_type is 0 (zlib); the spec requires it then to be non-zero",
                       104, .corrupt)
        }
        if compressionType != 0 && !incompatibleFeatures.contains(.compressionType) {
            throw fail("compression_type \(compressionType) needs the compression type incompatible bit", 104)
        }
        guard size <= Limits.maxVirtualSize else { throw fail("virtual size \(size) is too large", 24) }
        guard UInt64(l1Size) * 8 <= Limits.maxL1Bytes else {
            throw fail("l1_size \(l1Size) exceeds QEMU's limit of 32 MiB of L1 entries", 36)
        }
        let bytesPerL1 = clusterSize * UInt64(l2EntriesPerTable)
        let neededL1 = (size + bytesPerL1 - 1) / bytesPerL1
        guard UInt64(l1Size) >= neededL1 else {
            throw fail("l1_size \(l1Size) is too small for the virtual size \(size) (needs \(neededL1))", 36, .corrupt)
        }
        if l1Size > 0 {
            guard l1TableOffset % clusterSize == 0, l1TableOffset != 0 else {
                throw fail("l1_table_offset 0x\(String(l1TableOffset, radix: 16)) is not cluster aligned", 40, .corrupt)
            }
            guard l1TableOffset <= fileSize, UInt64(l1Size) * 8 <= fileSize - l1TableOffset else {
                throw fail("L1 table (\(l1Size) entries at 0x\(String(l1TableOffset, radix: 16))) runs past the end of the file",
                           40, .truncated)
            }
        }
        guard refcountTableOffset % clusterSize == 0 else {
            throw fail("refcount_table_offset is not cluster aligned", 48, .corrupt)
        }
        guard UInt64(refcountTableClusters) * clusterSize <= Limits.maxRefcountTableBytes else {
            throw fail("refcount_table_clusters \(refcountTableClusters) exceeds QEMU's limit of 8 MiB", 56)
        }
        guard refcountTableClusters > 0 || forCheck else {
            throw fail("refcount_table_clusters is 0 (the image has no refcount table; 'qbackup check --repair all' rebuilds it)", 56, .corrupt)
        }
        guard refcountTableOffset <= fileSize,
              UInt64(refcountTableClusters) * clusterSize <= fileSize - refcountTableOffset + clusterSize
        else {
            throw fail("refcount table runs past the end of the file", 48, .truncated)
        }
        guard nbSnapshots <= Limits.maxSnapshots else {
            throw fail("nb_snapshots \(nbSnapshots) exceeds the limit of 65536", 60)
        }
        // QEMU validates the offset even of an empty table.
        guard snapshotsOffset % clusterSize == 0 else {
            throw fail("snapshots_offset 0x\(String(snapshotsOffset, radix: 16)) is not cluster aligned", 64, .corrupt)
        }
        // A snapshot table past the end of the file is the snapshot table's damage, not the header's:
        // the active image still reads (QCowFile.snapshotTableDamage). One that cannot lie in any
        // file (offset + size beyond INT64_MAX) is refused, as QEMU's qcow2_validate_table does.
        if nbSnapshots > 0 && snapshotsOffset > UInt64(Int64.max) - UInt64(nbSnapshots) * 40 {
            throw fail("snapshot table offset 0x\(String(snapshotsOffset, radix: 16)) is invalid", 64)
        }
        if incompatibleFeatures.contains(.externalDataFile) && externalDataFile == nil {
            throw fail("external data file bit set but no external data file name extension", 72)
        }
    }
}

// MARK: - Encoding

extension QCowHeader {
    /// Encodes header, extensions (ending in the end marker) and backing file
    /// name into one buffer, updating the backing name offset and length fields.
    /// Throws if it does not fit in `limit` bytes (the first cluster).
    public func encoded(limit: Int) throws -> [UInt8] {
        var extensionBytes = ByteWriter()
        for ext in extensions {
            extensionBytes.u32(ext.type)
            extensionBytes.u32(UInt32(ext.data.count))
            extensionBytes.append(ext.data)
            extensionBytes.pad(to: 8)
        }
        extensionBytes.u32(HeaderExtension.end)
        extensionBytes.u32(0)
        let length = version == 2 ? Self.v2Length : Int(headerLength)
        let nameBytes = backingFile.map { Array($0.utf8) } ?? []
        let nameOffset = length + extensionBytes.bytes.count
        let total = nameOffset + nameBytes.count
        guard total <= limit else {
            throw QCowError(.invalidArgument, "header, extensions and backing file name need \(total) bytes, more than the first cluster (\(limit))",
                            offset: 0, region: "header")
        }
        var w = ByteWriter(capacity: total)
        w.u32(Self.magic)
        w.u32(version)
        w.u64(nameBytes.isEmpty ? 0 : UInt64(nameOffset))
        w.u32(UInt32(nameBytes.count))
        w.u32(clusterBits)
        w.u64(size)
        w.u32(cryptMethod)
        w.u32(l1Size)
        w.u64(l1TableOffset)
        w.u64(refcountTableOffset)
        w.u32(refcountTableClusters)
        w.u32(nbSnapshots)
        w.u64(snapshotsOffset)
        if version == 3 {
            w.u64(incompatibleFeatures.rawValue)
            w.u64(compatibleFeatures.rawValue)
            w.u64(autoclearFeatures.rawValue)
            w.u32(refcountOrder)
            w.u32(headerLength)
            if headerLength > 104 {
                w.u8(compressionType)
                w.zeros(min(7, Int(headerLength) - 105))
                w.append(unknownHeaderBytes)
            }
        }
        w.append(extensionBytes.bytes)
        w.append(nameBytes)
        return w.bytes
    }
}
