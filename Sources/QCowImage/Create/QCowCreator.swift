import Logging

/// What a new qcow2 image looks like (qemu-img create's qcow2 options).
public struct QCowCreateOptions: Sendable, Equatable {
    /// Virtual disk size in bytes (a multiple of 512).
    public var size: UInt64
    /// 512 B to 2 MiB, a power of two.
    public var clusterSize: Int = 65536
    /// 1, 2, 4, 8, 16, 32 or 64 (v2 images: 16 only).
    public var refcountBits: Int = 16
    /// Extended L2 entries with 32 subclusters per cluster (v3, clusters of 16 KiB and more).
    public var extendedL2: Bool = false
    /// How compressed clusters are compressed (zstd needs v3).
    public var compression: CompressionType = .zlib
    /// The backing file name as stored in the image (relative names are resolved from the image's folder).
    public var backingFile: String?
    /// The backing file's format, recorded in the backing format extension.
    public var backingFormat: ImageOpener.Format?
    /// qcow2 version: 3 (default) or 2 (compat=0.10).
    public var version: Int = 3

    /// Defaults as qemu-img create: v3, 64 KiB clusters, 16-bit refcounts, zlib, no backing file.
    public init(size: UInt64) { self.size = size }
}

/// Creates qcow2 images as qemu-img create does: header in cluster 0, the
/// refcount table in cluster 1, the first refcount block in cluster 2, then
/// the L1 table — allocated through the write engine, so the refcount
/// structures grow to describe whatever the L1 table needs.
public enum QCowCreator {
    /// Writes a new image onto `device` (which should be empty) and returns it open for writing.
    /// The backing file is recorded but not opened.
    @discardableResult
    public static func create(on device: BlockDevice, options: QCowCreateOptions,
                              logger: Logger = Logger(label: "qbackup.create", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws -> QCowFile
    {
        try validate(options)
        let cs = options.clusterSize
        let clusterBits = UInt32(cs.trailingZeroBitCount)
        let order = UInt32(options.refcountBits.trailingZeroBitCount)
        var header = QCowHeader(clusterBits: clusterBits, size: 0, refcountOrder: order)
        if options.version == 2 {
            header.version = 2
            header.headerLength = UInt32(QCowHeader.v2Length)
        }
        header.refcountTableOffset = UInt64(cs)
        header.refcountTableClusters = 1
        if options.extendedL2 { header.incompatibleFeatures.insert(.extendedL2) }
        if options.compression == .zstd {
            header.incompatibleFeatures.insert(.compressionType)
            header.compressionType = CompressionType.zstd.rawValue
        }
        header.backingFile = options.backingFile
        if let format = options.backingFormat {
            header.setExtension(HeaderExtension.backingFormat, Array(format.rawValue.utf8))
        }
        if options.version == 3 {
            // As QEMU: the feature name table is left out when it does not fit in cluster 0.
            var withTable = header
            withTable.setExtension(HeaderExtension.featureNameTable, QCowHeader.standardFeatureNameTable)
            if (try? withTable.encoded(limit: cs)) != nil { header = withTable }
        }
        var first = try header.encoded(limit: cs)
        first += [UInt8](repeating: 0, count: cs - first.count)
        // Refcount table: one entry, the block in cluster 2.
        var table = [UInt8](repeating: 0, count: cs)
        table.withUnsafeMutableBytes { BigEndian.store64($0, 0, UInt64(2 * cs)) }
        // Refcount block: clusters 0 (header), 1 (table) and 2 (itself) in use.
        var block = [UInt8](repeating: 0, count: cs)
        block.withUnsafeMutableBytes { raw in
            for i in 0..<3 { RefcountCodec.set(raw, order: Int(order), index: i, value: 1) }
        }
        try device.writeBytes(first + table + block, at: 0)
        try device.sync()

        let image = try QCowFile(device: device, writable: true, logger: logger)
        let bytesPerL2 = UInt64(cs) * UInt64(cs / (options.extendedL2 ? 16 : 8))
        let l1Size = (options.size + bytesPerL2 - 1) / bytesPerL2
        var l1Offset: UInt64 = 0
        if l1Size > 0 {
            let clusters = Int((l1Size * 8 + UInt64(cs) - 1) / UInt64(cs))
            l1Offset = try image.allocateClusters(clusters)
            try device.writeBytes([UInt8](repeating: 0, count: clusters * cs), at: l1Offset)
            try device.sync()
        }
        try image.rewriteHeader { h in
            h.size = options.size
            h.l1Size = UInt32(l1Size)
            h.l1TableOffset = l1Offset
        }
        image.l1 = [UInt64](repeating: 0, count: Int(l1Size))
        image.metadataClusters = nil
        image.noteFileEnd()
        logger.debug("created qcow2 image", metadata: ["file": "\(device.name)", "size": "\(options.size)"])
        return image
    }

    /// Creates a new qcow2 file at `path` in place (refusing an existing file), locked for
    /// writing, and returns it open. For files whose name the caller manages (repository
    /// layers); a file at a path the user named is made through `OutputFile` (`createFile`,
    /// `create(in:)`). The backing file is not opened; use `ImageOpener` for a chain.
    @discardableResult
    public static func create(at path: String, options: QCowCreateOptions,
                              logger: Logger = Logger(label: "qbackup.create", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws -> QCowFile
    {
        try validate(options)
        let device = try FileDevice(creating: path)
        do {
            try ImageLock.acquire(device, writable: true)
            return try create(on: device, options: options, logger: logger)
        } catch {
            device.close()
            throw error
        }
    }

    /// Writes a new qcow2 image into `output`'s temporary file, locked for writing, and returns
    /// it open; the caller fills it, then commits (or discards) `output`.
    public static func create(in output: OutputFile, options: QCowCreateOptions,
                              logger: Logger = Logger(label: "qbackup.create", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws -> QCowFile
    {
        try validate(options)
        try ImageLock.acquire(output.device, writable: true)
        return try create(on: output.device, options: options, logger: logger)
    }

    /// `qemu-img create`: a new qcow2 image at `path`, durably; an existing file is refused
    /// unless `overwrite`. A failure (a full disk, say) leaves nothing at `path`.
    public static func createFile(at path: String, options: QCowCreateOptions, overwrite: Bool = false,
                                  logger: Logger = Logger(label: "qbackup.create", factory: { _ in SwiftLogNoOpLogHandler() }))
        throws
    {
        try validate(options)
        let output = try OutputFile(path, overwrite: overwrite, durable: true)
        do {
            let image = try create(in: output, options: options, logger: logger)
            defer { image.close() }
            try output.commit()
        } catch {
            output.discard()
            throw error
        }
    }

    /// Creates a raw image of `size` bytes (sparse) at `path`, durably; an existing file is
    /// refused unless `overwrite`.
    public static func createRaw(at path: String, size: UInt64, overwrite: Bool = false) throws {
        let output = try OutputFile(path, overwrite: overwrite, durable: true)
        defer { output.device.close() }
        do {
            try output.device.resize(to: size)
            try output.commit()
        } catch {
            output.discard()
            throw error
        }
    }

    /// Refuses a cluster size QEMU refuses: a power of two from 512 B to 2 MiB.
    public static func validateClusterSize(_ size: Int) throws {
        guard size.nonzeroBitCount == 1, size >= 512, size <= 2 << 20 else {
            throw QCowError(.invalidArgument, "cluster size must be a power of two between 512 and 2097152 (got \(size))")
        }
    }

    /// Refuses option combinations QEMU refuses.
    public static func validate(_ o: QCowCreateOptions) throws {
        func fail(_ message: String) -> QCowError { QCowError(.invalidArgument, message) }
        guard o.version == 2 || o.version == 3 else { throw fail("qcow2 version must be 2 or 3, not \(o.version)") }
        try validateClusterSize(o.clusterSize)
        guard o.refcountBits.nonzeroBitCount == 1, o.refcountBits <= 64 else {
            throw fail("refcount bits must be a power of two from 1 to 64 (got \(o.refcountBits))")
        }
        guard o.size % 512 == 0 else { throw fail("image size must be a multiple of 512 bytes (got \(o.size))") }
        guard o.size <= QCowHeader.Limits.maxVirtualSize else { throw fail("image size \(o.size) is too large") }
        if o.extendedL2 && o.clusterSize < 16384 {
            throw fail("extended L2 entries need a cluster size of at least 16384 bytes (got \(o.clusterSize))")
        }
        if o.version == 2 {
            if o.refcountBits != 16 { throw fail("qcow2 version 2 images have 16-bit refcounts only") }
            if o.extendedL2 { throw fail("extended L2 entries need qcow2 version 3") }
            if o.compression != .zlib { throw fail("compression type zstd needs qcow2 version 3") }
        }
        if o.backingFormat != nil && o.backingFile == nil { throw fail("a backing format needs a backing file") }
        if let name = o.backingFile {
            guard !name.isEmpty, name.utf8.count <= QCowHeader.Limits.maxBackingNameLength else {
                throw fail("backing file name must be 1 to 1023 bytes")
            }
        }
        let bytesPerL2 = UInt64(o.clusterSize) * UInt64(o.clusterSize / (o.extendedL2 ? 16 : 8))
        let l1Bytes = (o.size + bytesPerL2 - 1) / bytesPerL2 * 8
        guard l1Bytes <= QCowHeader.Limits.maxL1Bytes else {
            throw fail("image size \(o.size) needs an L1 table of \(l1Bytes) bytes, more than QEMU's 32 MiB limit; use a larger cluster size")
        }
    }
}
