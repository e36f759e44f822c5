import QCowImage

/// The persistent bitmaps of one qcow2 image: reads and validates the
/// bitmaps extension and directory, loads bitmap data, and (with the write
/// engine, see `BitmapCatalog+Commit.swift`) changes them crash-safely.
///
/// Opening validates the extension and every directory entry with QEMU's
/// rules; a broken directory throws (use `BitmapCatalog.check` to get
/// findings instead). Bitmap tables and data are read when a bitmap is loaded.
public final class BitmapCatalog {
    /// The image.
    public let file: QCowFile
    /// Cluster size, file size and virtual size, as validation sees them.
    public var geometry: BitmapGeometry {
        let size = (try? file.device.size()) ?? file.fileSize
        return BitmapGeometry(clusterSize: file.clusterSize, fileSize: max(size, file.fileSize), virtualSize: file.virtualSize)
    }
    /// The bitmaps extension, nil when the image has none.
    public internal(set) var bitmapsExtension: BitmapsExtension?
    /// The directory entries, in directory order.
    public internal(set) var entries: [BitmapDirectoryEntry]
    /// Whether the autoclear `bitmaps` bit is set (without it, every bitmap is inconsistent).
    public internal(set) var autoclearBitSet: Bool
    /// When the extension is stale (autoclear bit cleared) and its directory
    /// could not even be read: why. The bitmaps are then unknown and ignored, as QEMU ignores them.
    public internal(set) var staleDirectoryError: BitmapError?

    /// Bitmaps held in memory while dirty tracking is on (see `startTracking`), by name.
    var tracked: [String: DirtyBitmap] = [:]
    /// Whether `startTracking` has attached the catalog to the file's write observer.
    public internal(set) var isTracking = false

    /// Reads the bitmaps of `file`, validating the extension and the directory.
    public init(file: QCowFile) throws {
        self.file = file
        bitmapsExtension = nil
        entries = []
        autoclearBitSet = false
        try reload()
    }

    /// A catalog that does not read the directory (`reading` false), for repair.
    init(file: QCowFile, reading: Bool) throws {
        self.file = file
        bitmapsExtension = nil
        entries = []
        autoclearBitSet = file.header.autoclearFeatures.contains(.bitmaps)
        if reading { try reload() }
    }

    /// Re-reads the extension and directory from the file's current header.
    func reload() throws {
        let geometry = self.geometry
        let header = file.header
        autoclearBitSet = header.autoclearFeatures.contains(.bitmaps)
        staleDirectoryError = nil
        bitmapsExtension = nil
        entries = []
        guard let data = header.extensionData(HeaderExtension.bitmaps) else { return }
        do {
            let (ext, list) = try Self.readDirectory(data: data, header: header, device: file.device, geometry: geometry)
            bitmapsExtension = ext
            entries = list
        } catch let error as BitmapError {
            let located = error.inFile(file.filename)
            // A program that did not know bitmaps wrote the file: QEMU ignores the extension then.
            guard autoclearBitSet else {
                staleDirectoryError = located
                return
            }
            throw located
        }
    }

    /// Validates the extension, reads the directory and validates every entry and the names.
    static func readDirectory(data: [UInt8], header: QCowHeader, device: BlockDevice,
                              geometry: BitmapGeometry) throws -> (BitmapsExtension, [BitmapDirectoryEntry]) {
        let extOffset = header.extensionDataOffset(HeaderExtension.bitmaps) ?? 0
        let ext = try BitmapsExtension(validating: data, extensionOffset: extOffset, clusterSize: geometry.clusterSize,
                                       fileSize: geometry.fileSize)
        let bytes = try bitmapLayer {
            try device.readBytes(ext.directorySize, at: ext.directoryOffset, region: "bitmap directory")
        }
        let raws = try BitmapDirectory.decode(bytes, baseOffset: ext.directoryOffset, expectedCount: ext.count)
        let list = try raws.map { try BitmapDirectoryEntry(validating: $0.entry, entryOffset: $0.offset, geometry: geometry) }
        if let (first, second) = BitmapDirectory.firstDuplicate(list.map(\.nameBytes)) {
            throw BitmapError(.corrupt,
                              "two bitmaps have the same name (entries at 0x\(String(list[first].entryOffset ?? 0, radix: 16)) and 0x\(String(list[second].entryOffset ?? 0, radix: 16))); names must be unique",
                              offset: list[second].entryOffset, region: "bitmap directory", bitmap: list[second].name)
        }
        return (ext, list)
    }

    // MARK: - Queries

    /// The entry named `name`, or nil.
    public func entry(named name: String) -> BitmapDirectoryEntry? {
        let bytes = Array(name.utf8)
        return entries.first { $0.nameBytes == bytes }
    }

    /// Why a bitmap may not be used (nil when it is consistent).
    public func inconsistency(of entry: BitmapDirectoryEntry) -> BitmapInconsistency? {
        // A bitmap tracked in memory is marked in_use on disk, but what we hold is right.
        if tracked[entry.name] != nil { return nil }
        if !autoclearBitSet { return .staleExtension }
        if entry.isInUse { return .inUse }
        if entry.hasIncompatibleExtraData { return .incompatibleExtraData }
        return nil
    }

    /// The entry named `name`, or a `invalidArgument` error naming the image.
    func requireEntry(_ name: String) throws -> BitmapDirectoryEntry {
        guard let entry = entry(named: name) else {
            throw BitmapError(.invalidArgument, "no bitmap named '\(name)' in the image", path: file.filename, bitmap: name)
        }
        return entry
    }

    /// The entry named `name` if it is consistent; else an error that says why `operation` is refused.
    func requireConsistent(_ name: String, for operation: String) throws -> BitmapDirectoryEntry {
        let entry = try requireEntry(name)
        if let why = inconsistency(of: entry) {
            throw BitmapError(.refused, "cannot \(operation): the bitmap is inconsistent (\(why.description)); only list, dump and remove are allowed",
                              path: file.filename, offset: entry.entryOffset, region: "bitmap directory", bitmap: entry.name)
        }
        return entry
    }

    /// Reads the bitmap table of `entry` and checks its entries.
    public func table(of entry: BitmapDirectoryEntry) throws -> BitmapTable {
        do {
            return try BitmapTable.read(for: entry, from: file.device, geometry: geometry)
        } catch let error as BitmapError {
            throw error.inFile(file.filename).forBitmap(entry.name)
        }
    }

    /// The bitmap named `name`. An inconsistent bitmap is refused unless
    /// `allowInconsistent` (its data may be outdated). While tracking, the
    /// in-memory bitmap is returned.
    public func load(_ name: String, allowInconsistent: Bool = false) throws -> DirtyBitmap {
        let entry = allowInconsistent ? try requireEntry(name) : try requireConsistent(name, for: "use it")
        if let live = tracked[name] { return live }
        return try loadFromDisk(entry)
    }

    /// Reads table and data of `entry` from the file.
    func loadFromDisk(_ entry: BitmapDirectoryEntry) throws -> DirtyBitmap {
        let table = try table(of: entry)
        do {
            return try DirtyBitmap.load(entry: entry, table: table, from: file.device, virtualSize: geometry.virtualSize,
                                        clusterSize: geometry.clusterSize)
        } catch let error as BitmapError {
            throw error.inFile(file.filename).forBitmap(entry.name)
        }
    }

    /// One line of `bitmap list` per bitmap: name, granularity, enabled,
    /// in_use, and the dirty byte count (nil for an inconsistent bitmap).
    public func list() throws -> [BitmapSummary] {
        try entries.map { entry in
            let why = inconsistency(of: entry)
            let dirty = why == nil ? try load(entry.name).dirtyByteCount : nil
            return BitmapSummary(name: entry.name, granularity: entry.granularity, enabled: entry.isEnabled,
                                 inUse: entry.isInUse || tracked[entry.name] != nil, inconsistency: why,
                                 dirtyBytes: dirty, extraDataSize: entry.extraData.count)
        }
    }

    /// The bitmap for `bitmap dump`, with a warning when it is inconsistent
    /// (dump is allowed for an inconsistent bitmap, but its data may be outdated).
    public func dump(_ name: String) throws -> BitmapDump {
        let entry = try requireEntry(name)
        let why = inconsistency(of: entry)
        let bitmap = try load(name, allowInconsistent: true)
        return BitmapDump(name: entry.name, bitmap: bitmap,
                          warning: why.map { "bitmap '\(entry.name)' is inconsistent (\($0.description)); its extents may be outdated" })
    }

    /// The bitmaps as `qemu-img info` shows them: name, granularity, flags ("in-use", "auto").
    public func info() -> [BitmapInfo] {
        entries.map { entry in
            var flags: [String] = []
            if entry.isInUse || !autoclearBitSet || tracked[entry.name] != nil { flags.append("in-use") }
            if entry.isEnabled { flags.append("auto") }
            return BitmapInfo(name: entry.name, granularity: entry.granularity, flags: flags)
        }
    }

    /// The bitmaps of `file` as `qemu-img info` shows them (empty when it has none).
    public static func info(for file: QCowFile) throws -> [BitmapInfo] {
        try BitmapCatalog(file: file).info()
    }
}

/// Why a bitmap is inconsistent and may only be listed, dumped or removed.
public enum BitmapInconsistency: Equatable, Sendable, CustomStringConvertible {
    /// The in_use flag is set: it was not saved correctly (a crash while the image was in use).
    case inUse
    /// The autoclear bitmaps bit is cleared: a program that does not know bitmaps wrote the image.
    case staleExtension
    /// It has extra data we do not know, without the extra_data_compatible flag.
    case incompatibleExtraData

    public var description: String {
        switch self {
        case .inUse: return "in_use is set: it was not saved correctly, e.g. the program using the image crashed"
        case .staleExtension: return "the autoclear bitmaps bit is cleared: a program that does not know bitmaps modified the image"
        case .incompatibleExtraData: return "it has unknown extra data without the extra_data_compatible flag"
        }
    }
}

/// One bitmap as `bitmap list` shows it.
public struct BitmapSummary: Equatable, Sendable {
    public var name: String
    /// Bytes per bit.
    public var granularity: UInt64
    /// The auto flag: the bitmap tracks writes.
    public var enabled: Bool
    /// The in_use flag (set on disk, or the bitmap is being tracked in memory).
    public var inUse: Bool
    /// Why the bitmap is inconsistent, or nil.
    public var inconsistency: BitmapInconsistency?
    /// Dirty bytes of the disk, nil when the bitmap is inconsistent.
    public var dirtyBytes: UInt64?
    /// Bytes of extra data kept with the entry.
    public var extraDataSize: Int
}

/// One bitmap in qemu-img info's shape (`format-specific.data.bitmaps[]`).
public struct BitmapInfo: Equatable, Sendable {
    public var name: String
    public var granularity: UInt64
    /// "in-use" and/or "auto", in that order, as qemu-img lists them.
    public var flags: [String]
}

/// What `bitmap dump` shows: the bitmap, and a warning when it is inconsistent.
public struct BitmapDump: Sendable {
    public var name: String
    public var bitmap: DirtyBitmap
    public var warning: String?
}

extension BitmapCatalog {
    /// Opens `path` as qcow2 (read-only, or writable with the image lock held and
    /// refused if its metadata is damaged: `requireUndamaged`), runs `body` on its catalog, stops tracking if it was started, and closes the image.
    /// `lock` false (-U, read-only only) opens it without QEMU's image lock.
    public static func withCatalog<T>(_ path: String, writable: Bool, lock: Bool = true,
                                      _ body: (BitmapCatalog) throws -> T) throws -> T {
        let opened = try ImageOpener.open(path, format: .qcow2, writable: writable, lock: lock || writable)
        defer { opened.close() }
        guard let file = opened as? QCowFile else {
            throw BitmapError(.invalidFormat, "not a qcow2 image", path: path)
        }
        // Opening the catalog names a broken bitmap structure precisely (and writes nothing);
        // the rest of the metadata is checked before the body may write.
        let catalog = try BitmapCatalog(file: file)
        if writable { try requireUndamaged(file) }
        let result = try body(catalog)
        try catalog.close()
        return result
    }
}
