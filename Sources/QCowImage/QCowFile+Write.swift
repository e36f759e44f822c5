/// What happened to a guest range, as told to `QCowFile.writeObserver`.
public enum GuestWriteKind: Sendable {
    /// New guest data was written.
    case data
    /// The range now reads as zeros.
    case zero
    /// The range was discarded (reads as zeros, or from the backing file on v2 images).
    case discard
}

/// Page-aligned memory reused by the data path, so large writes are assembled
/// without allocating per cluster.
public final class ScratchBuffer {
    private var storage = UnsafeMutableRawBufferPointer(start: nil, count: 0)

    public init() {}

    /// `count` bytes (contents undefined; kept while no larger call grows the buffer).
    public func reserve(_ count: Int) -> UnsafeMutableRawBufferPointer {
        if storage.count < count {
            storage.deallocate()
            storage = .allocate(byteCount: count, alignment: 4096)
        }
        return UnsafeMutableRawBufferPointer(rebasing: storage[0..<count])
    }

    deinit { storage.deallocate() }
}

// MARK: - Opening for write, header updates, durability

extension QCowFile {
    /// Refuses images that are unsafe to write, and notes unknown autoclear bits: the
    /// spec requires clearing them before writing, which the first write does (so an
    /// image opened for writing and refused, e.g. as damaged, stays byte-identical).
    func prepareForWriting() throws {
        if header.incompatibleFeatures.contains(.dirty) {
            throw QCowError(.refused, "image was not closed cleanly (\(header.featureName(kind: .incompatible, bit: 0)) set, refcounts may be stale); repair it first with 'qemu-img check -r all' or 'qbackup check --repair all'",
                            path: filename, offset: 72, region: "header")
        }
        if header.incompatibleFeatures.contains(.externalDataFile) {
            throw QCowError(.unsupported, "writing images with an external data file is not supported",
                            path: filename, offset: 72, region: "header")
        }
        unknownAutoclearPending = !header.autoclearFeatures.subtracting(.known).isEmpty
    }

    /// Throws unless the image was opened writable and no earlier write failed.
    func checkWritable() throws {
        guard writable else {
            throw QCowError(.refused, "image is open read-only", path: filename)
        }
        if let failure = writeFailure {
            throw QCowError(.refused, "an earlier write failed (\(failure.message)); the image takes no more writes until reopened",
                            path: filename, offset: failure.offset, region: failure.region)
        }
        if unknownAutoclearPending {
            // Before the first write: a program that writes must clear the autoclear bits it does not know.
            unknownAutoclearPending = false
            try guarded { try writeHeader(header) }
        }
    }

    /// Runs a write step; any failure leaves the image refusing further writes,
    /// since memory and disk may no longer agree.
    @discardableResult
    func guarded<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let error as QCowError {
            if writeFailure == nil { writeFailure = error }
            throw error.inFile(filename)
        } catch {
            writeFailure = QCowError(.io, "\(error)", path: filename)
            throw error
        }
    }

    /// Re-encodes the header after `update`, with its extensions (unknown ones
    /// and unknown header fields preserved, unknown autoclear bits cleared),
    /// writes it into cluster 0 and syncs.
    public func rewriteHeader(_ update: (inout QCowHeader) throws -> Void) throws {
        try checkWritable()
        var next = header
        try update(&next)
        try guarded { try writeHeader(next) }
    }

    /// Writes `next` over the header and syncs; bytes the old encoding used past the new one are zeroed.
    func writeHeader(_ next: QCowHeader) throws {
        var next = next
        next.autoclearFeatures = next.autoclearFeatures.intersection(.known)
        var bytes = try next.encoded(limit: clusterSize)
        let oldLength = (try? header.encoded(limit: clusterSize).count) ?? clusterSize
        let padded = min(clusterSize, (max(bytes.count, oldLength) + 511) & ~511)
        bytes += [UInt8](repeating: 0, count: padded - bytes.count)
        try device.writeBytes(bytes, at: 0)
        try device.sync()
        header = next
        noteFileEnd()
    }

    /// An ordering barrier of the write engine: an fsync, unless `syncBarriers` is off.
    func syncBarrier() throws {
        if syncBarriers { try device.sync() }
    }

    /// Writes what completed writes left only in memory (refcount changes) to the file,
    /// without syncing: afterwards the file's bytes are final. `flush()` also syncs.
    public func writeBack() throws {
        guard writable else { return }
        try guarded { try commitRefcounts() }
    }

    /// Makes every completed write durable (syncs the image file and the data file).
    public func flush() throws {
        guard writable else { return }
        try guarded {
            try commitRefcounts()
            try device.sync()
            if dataDevice !== device { try dataDevice.sync() }
        }
    }

    /// Sets the corrupt bit (best effort) and returns the error to throw, as QEMU
    /// does when a write would overwrite metadata.
    func markCorrupt(_ message: String, offset: UInt64, region: String) -> QCowError {
        let error = QCowError(.corrupt, message + "; the image is now marked corrupt", path: filename, offset: offset,
                              region: region)
        var next = header
        next.incompatibleFeatures.insert(.corrupt)
        try? writeHeader(next)
        writeFailure = error
        logger.error("marked image corrupt", metadata: ["reason": "\(message)"])
        return error
    }

    // MARK: - Overlap check

    /// Host clusters that hold metadata: header, L1 and refcount tables, refcount
    /// blocks, active L2 tables, the snapshot table and snapshot L1 tables.
    func metadataClusterSet() throws -> Set<UInt64> {
        if let set = metadataClusters { return set }
        var set: Set<UInt64> = [0]
        let bits = UInt64(clusterBits)
        func add(_ offset: UInt64, _ length: UInt64) {
            guard length > 0 else { return }
            for c in (offset >> bits)...((offset + length - 1) >> bits) { set.insert(c) }
        }
        add(header.l1TableOffset, UInt64(header.l1Size) * 8)
        add(header.refcountTableOffset, UInt64(header.refcountTableClusters) << bits)
        for offset in try refcounts().blockOffsets { add(offset, 1) }
        for raw in l1 where L1Entry(rawValue: raw).l2Offset != 0 { add(L1Entry(rawValue: raw).l2Offset, 1) }
        if header.nbSnapshots > 0 {
            var w = ByteWriter()
            for snap in snapshots { snap.encode(into: &w) }
            add(header.snapshotsOffset, UInt64(w.bytes.count))
            for snap in snapshots { add(snap.l1TableOffset, UInt64(snap.l1Size) * 8) }
        }
        metadataClusters = set
        return set
    }

    /// Refuses (and marks the image corrupt) a data write to `[host, host+length)` that would hit metadata.
    func checkDataOverlap(host: UInt64, length: Int) throws {
        let set = try metadataClusterSet()
        let bits = UInt64(clusterBits)
        for c in (host >> bits)...((host + UInt64(length) - 1) >> bits) where set.contains(c) {
            throw markCorrupt("a data write to 0x\(String(host, radix: 16)) would overwrite metadata in cluster 0x\(String(c << bits, radix: 16))",
                              offset: c << bits, region: "L2 table")
        }
    }

    /// Checks a guest range against the virtual size.
    func checkGuestRange(_ offset: UInt64, _ length: UInt64) throws {
        guard offset <= virtualSize, length <= virtualSize - offset else {
            throw QCowError(.invalidArgument, "range 0x\(String(offset, radix: 16))+\(length) lies past the end of the disk (\(virtualSize) bytes)",
                            path: filename)
        }
    }
}
