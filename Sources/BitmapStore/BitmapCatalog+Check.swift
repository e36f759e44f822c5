import QCowImage

/// One problem the bitmap check found.
public struct BitmapFinding: Equatable, Sendable, CustomStringConvertible {
    /// How bad it is.
    public enum Severity: String, Sendable {
        /// Metadata breaks the spec or QEMU's rules: QEMU cannot open the image's bitmaps.
        case error
        /// Allowed but worth knowing (an in_use bitmap, nonzero tail bits, a stale extension).
        case warning
    }

    /// The metadata region ("bitmaps extension", "bitmap directory", "bitmap table", "bitmap data").
    public var region: String
    /// File offset of the structure, when known.
    public var offset: UInt64?
    /// What is wrong, naming the spec field.
    public var message: String
    public var severity: Severity
    /// The bitmap concerned, if any.
    public var bitmap: String?

    public init(region: String, offset: UInt64?, message: String, severity: Severity, bitmap: String? = nil) {
        self.region = region
        self.offset = offset
        self.message = message
        self.severity = severity
        self.bitmap = bitmap
    }

    init(_ error: BitmapError, severity: Severity = .error) {
        self.init(region: error.region ?? "bitmaps", offset: error.offset, message: error.message, severity: severity,
                  bitmap: error.bitmap)
    }

    public var description: String {
        var parts = ["\(severity.rawValue): \(region)"]
        if let offset { parts[0] += " at 0x" + String(offset, radix: 16) }
        if let bitmap { parts.append("bitmap '\(bitmap)'") }
        parts.append(message)
        return parts.joined(separator: ": ")
    }
}

/// Host clusters that bitmap metadata owns, for the refcount checker.
public struct BitmapClusters: Equatable, Sendable {
    /// First byte of the first cluster.
    public var offset: UInt64
    /// Number of contiguous clusters.
    public var count: Int
    /// What they hold: "bitmap directory", "bitmap table 'NAME'", "bitmap data 'NAME'".
    public var what: String

    public init(offset: UInt64, count: Int, what: String) {
        self.offset = offset
        self.count = count
        self.what = what
    }
}

/// What the bitmap check returns: findings, and the clusters bitmaps own.
public struct BitmapCheckReport: Sendable {
    public var findings: [BitmapFinding]
    /// Every host cluster range that valid bitmap metadata references (each reference once).
    public var ownedClusters: [BitmapClusters]
    /// Bitmaps whose metadata is broken (what `repair` would drop), by name.
    public var brokenBitmaps: [String]
    /// File offsets of the broken directory entries (two entries may share a name).
    public var brokenEntryOffsets: [UInt64]
    /// Whether the directory itself cannot be read (repair would drop the extension).
    public var directoryBroken: Bool
}

extension BitmapCatalog {
    /// Checks every bitmap rule of the spec and QEMU (extension, directory,
    /// entries, names, tables, tail bits, autoclear bit) without trusting
    /// anything, and lists the clusters bitmap metadata owns. Throws only when
    /// the file cannot be read.
    ///
    /// Owned clusters are reported for every structure that lies inside the
    /// file and is aligned, so the refcount checker neither frees them as
    /// leaks nor misses an overlap. A stale extension (autoclear bit cleared)
    /// is reported but its clusters are still listed: until `repair` drops it,
    /// dropping its refcounts would let its clusters be reused under it.
    public static func check(_ file: QCowFile) throws -> BitmapCheckReport {
        var report = BitmapCheckReport(findings: [], ownedClusters: [], brokenBitmaps: [], brokenEntryOffsets: [], directoryBroken: false)
        let header = file.header
        guard let data = header.extensionData(HeaderExtension.bitmaps) else {
            return report
        }
        let size = try bitmapLayer { try file.device.size() }
        let geometry = BitmapGeometry(clusterSize: file.clusterSize, fileSize: size, virtualSize: file.virtualSize)
        let clusterSize = UInt64(file.clusterSize)
        func clusters(_ bytes: UInt64) -> Int { Int((bytes + clusterSize - 1) / clusterSize) }
        if !header.autoclearFeatures.contains(.bitmaps) {
            report.findings.append(BitmapFinding(region: "header", offset: 88,
                                                 message: "the bitmaps extension is present but the autoclear bitmaps bit is cleared: a program that does not know bitmaps modified the image, so every bitmap is inconsistent",
                                                 severity: .warning))
        }
        let extOffset = header.extensionDataOffset(HeaderExtension.bitmaps) ?? 0
        let ext: BitmapsExtension
        let raws: [(entry: RawBitmapDirectoryEntry, offset: UInt64)]
        do {
            ext = try BitmapsExtension(validating: data, extensionOffset: extOffset, clusterSize: file.clusterSize, fileSize: size)
            report.ownedClusters.append(BitmapClusters(offset: ext.directoryOffset, count: clusters(UInt64(ext.directorySize)),
                                                       what: "bitmap directory"))
            let bytes = try bitmapLayer { try file.device.readBytes(ext.directorySize, at: ext.directoryOffset, region: "bitmap directory") }
            raws = try BitmapDirectory.decode(bytes, baseOffset: ext.directoryOffset, expectedCount: ext.count)
        } catch let error as BitmapError {
            report.findings.append(BitmapFinding(error))
            report.directoryBroken = true
            return report
        }
        var seen: [[UInt8]: UInt64] = [:]
        for (raw, entryOffset) in raws {
            let name = String(decoding: raw.name, as: UTF8.self)
            var broken = false
            for violation in BitmapDirectoryEntry.violations(of: raw, entryOffset: entryOffset, geometry: geometry) {
                report.findings.append(BitmapFinding(violation))
                broken = true
            }
            if let first = seen[raw.name] {
                report.findings.append(BitmapFinding(region: "bitmap directory", offset: entryOffset,
                                                     message: "name is also used by the entry at 0x\(String(first, radix: 16)); names must be unique",
                                                     severity: .error, bitmap: name))
                broken = true
            } else {
                seen[raw.name] = entryOffset
            }
            let flags = BitmapFlags(rawValue: raw.flags)
            if flags.contains(.inUse) {
                report.findings.append(BitmapFinding(region: "bitmap directory", offset: entryOffset + 12,
                                                     message: "in_use is set: the bitmap is inconsistent (not saved correctly); the next backup with it must be a full one",
                                                     severity: .warning, bitmap: name))
            }
            // The table, if its place is sane.
            let tableOK = raw.bitmapTableOffset != 0 && raw.bitmapTableOffset % clusterSize == 0 && raw.bitmapTableSize != 0
                && Int(raw.bitmapTableSize) <= BitmapLimits.maxTableEntries
                && raw.bitmapTableOffset <= size && UInt64(raw.bitmapTableSize) * 8 <= size - raw.bitmapTableOffset
            if tableOK {
                report.ownedClusters.append(BitmapClusters(offset: raw.bitmapTableOffset, count: clusters(UInt64(raw.bitmapTableSize) * 8),
                                                           what: "bitmap table '\(name)'"))
                let table = try BitmapTable.readUnchecked(offset: raw.bitmapTableOffset, size: Int(raw.bitmapTableSize),
                                                          from: file.device, bitmap: name)
                let problems = table.violations(geometry: geometry, bitmap: name)
                report.findings += problems.map { BitmapFinding($0) }
                if !problems.isEmpty { broken = true }
                var lastData: (index: Int, offset: UInt64)?
                for (i, entry) in table.entries.enumerated() {
                    guard entry.rawValue & BitmapTableEntry.reservedMask == 0, let offset = entry.dataOffset,
                          entry.rawValue & BitmapTableEntry.allOnesFlag == 0, offset % clusterSize == 0,
                          offset <= size, clusterSize <= size - offset else { continue }
                    if let last = report.ownedClusters.last, last.what == "bitmap data '\(name)'",
                       last.offset + UInt64(last.count) * clusterSize == offset {
                        report.ownedClusters[report.ownedClusters.count - 1].count += 1
                    } else {
                        report.ownedClusters.append(BitmapClusters(offset: offset, count: 1, what: "bitmap data '\(name)'"))
                    }
                    lastData = (i, offset)
                }
                if !broken, BitmapLimits.granularityBits.contains(Int(raw.granularityBits)), let last = lastData,
                   last.index == table.entries.count - 1 {
                    try checkTailBits(file: file, raw: raw, name: name, dataOffset: last.offset, index: last.index, into: &report)
                }
            }
            if broken {
                report.brokenBitmaps.append(name)
                report.brokenEntryOffsets.append(entryOffset)
            }
        }
        return report
    }

    /// Bits of the last data cluster past the end of the bitmap must be zero.
    static func checkTailBits(file: QCowFile, raw: RawBitmapDirectoryEntry, name: String, dataOffset: UInt64, index: Int,
                              into report: inout BitmapCheckReport) throws {
        let granularity = UInt64(1) << UInt64(raw.granularityBits)
        let bits = (file.virtualSize + granularity - 1) / granularity
        let bitsBefore = UInt64(index) * UInt64(file.clusterSize) * 8
        guard bits > bitsBefore else { return }
        let usedBits = bits - bitsBefore
        guard usedBits < UInt64(file.clusterSize) * 8 else { return }
        let bytes = try bitmapLayer(bitmap: name) { try file.device.readBytes(file.clusterSize, at: dataOffset, region: "bitmap data") }
        let firstByte = Int(usedBits / 8)
        var dirty = false
        if usedBits % 8 != 0, bytes[firstByte] >> (usedBits % 8) != 0 { dirty = true }
        let fullFrom = firstByte + (usedBits % 8 == 0 ? 0 : 1)
        if bytes[fullFrom...].contains(where: { $0 != 0 }) { dirty = true }
        if dirty {
            report.findings.append(BitmapFinding(region: "bitmap data", offset: dataOffset,
                                                 message: "tail bits past the end of the bitmap (bit \(bits) on) are not zero",
                                                 severity: .warning, bitmap: name))
        }
    }

    /// The host clusters bitmap metadata owns (directory, tables, data), for the refcount checker.
    public static func ownedClusters(of file: QCowFile) throws -> [BitmapClusters] {
        try check(file).ownedClusters
    }

    /// What `repair` did.
    public struct RepairResult: Equatable, Sendable {
        /// Bitmaps dropped because their metadata was broken.
        public var dropped: [String]
        /// Whether the whole extension was dropped (its directory could not be read).
        public var droppedExtension: Bool
    }

    /// Drops every bitmap whose metadata is broken (or the whole extension when
    /// its directory cannot be read), crash-safely. Their clusters are not freed
    /// (they cannot be trusted): they become leaks for `check --repair leaks`.
    /// The remaining bitmaps are kept as they are.
    public static func repair(_ file: QCowFile) throws -> RepairResult {
        let report = try check(file)
        guard report.directoryBroken || !report.brokenBitmaps.isEmpty else {
            return RepairResult(dropped: [], droppedExtension: false)
        }
        guard file.writable else { throw BitmapError(.refused, "the image is open read-only", path: file.filename) }
        let geometry = BitmapGeometry(clusterSize: file.clusterSize, fileSize: try bitmapLayer { try file.device.size() },
                                      virtualSize: file.virtualSize)
        var keep: [BitmapDirectoryEntry] = []
        var dropped: [String] = report.brokenBitmaps
        if !report.directoryBroken, let data = file.header.extensionData(HeaderExtension.bitmaps) {
            let extOffset = file.header.extensionDataOffset(HeaderExtension.bitmaps) ?? 0
            let ext = try BitmapsExtension(validating: data, extensionOffset: extOffset, clusterSize: file.clusterSize,
                                           fileSize: geometry.fileSize)
            let bytes = try bitmapLayer { try file.device.readBytes(ext.directorySize, at: ext.directoryOffset, region: "bitmap directory") }
            var names = Set<[UInt8]>()
            for (raw, offset) in try BitmapDirectory.decode(bytes, baseOffset: ext.directoryOffset, expectedCount: ext.count) {
                guard !report.brokenEntryOffsets.contains(offset), !names.contains(raw.name),
                      let entry = try? BitmapDirectoryEntry(validating: raw, entryOffset: offset, geometry: geometry) else { continue }
                names.insert(raw.name)
                keep.append(entry)
            }
        } else {
            dropped = []
        }
        // Keep the stale state as it was: with the autoclear bit cleared, the kept bitmaps stay inconsistent.
        let plan = CommitPlan(entries: keep)
        let catalog = try BitmapCatalog.unvalidated(file: file)
        try catalog.commitRepair(plan, stale: !file.header.autoclearFeatures.contains(.bitmaps))
        return RepairResult(dropped: dropped, droppedExtension: report.directoryBroken || keep.isEmpty)
    }

    /// A catalog that has not read the directory (for repair of a broken one).
    static func unvalidated(file: QCowFile) throws -> BitmapCatalog {
        try BitmapCatalog(file: file, reading: false)
    }

    /// Writes the repaired directory; old clusters are left to leak.
    func commitRepair(_ plan: CommitPlan, stale: Bool) throws {
        if stale {
            // Mark the survivors in_use: the autoclear bit we set vouches only for the directory.
            for i in plan.entries.indices { plan.entries[i].flags.insert(.inUse) }
        }
        do {
            try bitmapLayer { try commit(plan) }
        } catch {
            for run in plan.allocated { try? file.freeClusters(at: run.offset, count: run.count) }
            throw (error as? BitmapError)?.inFile(file.filename) ?? error
        }
    }
}
