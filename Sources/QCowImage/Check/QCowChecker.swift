/// The qcow2 consistency checker: rebuilds refcounts from every reference
/// (header, L1/L2 tables and data, snapshots, refcount structures, extensions,
/// and what contributors such as BitmapStore add), compares them with the
/// stored refcounts, checks the COPIED flags, and reports. Repair is explicit.
public struct QCowChecker {
    public enum RepairMode: String, Sendable, CaseIterable {
        case none, leaks, all
    }

    /// Findings kept in a report; counts go on past it.
    public static let maxFindings = 10_000
    /// Images with more host clusters than this are refused (the computed refcounts are 4 bytes a cluster).
    public static let maxClusters: UInt64 = 1 << 30

    let image: QCowFile
    let contributors: [CheckContributor]
    var report: CheckReport
    let clusterSize: UInt64
    let clusterBits: Int
    var nbClusters: UInt64 = 0
    /// References found, per host cluster (saturating).
    var computed: [UInt32] = []
    var stored: StoredRefcounts
    /// Whether the walk repairs L2 entries as it goes (QEMU does so for unaligned
    /// preallocated clusters under `-r all`), and how many it repaired.
    var repairEntries = false
    var entriesRepaired = 0
    /// A refcount block that is also referenced as something else (see `checkRefcountBlockOverlaps`).
    var refcountBlockOverlap = false

    // MARK: - Entry point

    /// Checks `image` and, with `repair`, fixes what the mode allows, then checks again.
    public static func check(_ image: QCowFile, repair: RepairMode = .none,
                             contributors: [CheckContributor] = []) throws -> CheckReport {
        guard repair == .none || image.writable else {
            throw QCowError(.refused, "repair needs the image opened for writing", path: image.filename)
        }
        var checker = try QCowChecker(image: image, contributors: contributors)
        checker.repairEntries = repair == .all
        try checker.run()
        if checker.entriesRepaired > 0 {
            try image.device.sync()
            image.dropCaches()
        }
        // A repair writes the image, and a program that writes clears the autoclear bits it does not
        // know (the spec; QEMU clears them when it opens the image for writing, so its -r all does too).
        if repair != .none && !image.header.autoclearFeatures.subtracting(.known).isEmpty {
            try image.rewriteHeader { _ in }
        }
        let marked = !image.header.incompatibleFeatures.isDisjoint(with: [.corrupt, .dirty])
        guard repair != .none, checker.report.leaks + checker.report.corruptions > 0 || checker.needsRebuild || marked
        else {
            return checker.report
        }
        let first = checker.report
        if repair == .all && image.snapshotTableDamage != nil {
            // The unreadable table goes first; the references are then counted again without it,
            // so the clusters it covered become leaks this repair frees (not leaks left behind).
            try image.dropDamagedSnapshotTable()
            checker = try QCowChecker(image: image, contributors: contributors)
            checker.repairEntries = true
            try checker.run()
        }
        _ = try checker.repair(mode: repair)
        // Check again, as qemu-img does, and report what remains plus what was fixed.
        image.dropCaches()
        var again = try QCowChecker(image: image, contributors: contributors)
        try again.run()
        again.report.leaksFixed = max(0, first.leaks - again.report.leaks)
        again.report.corruptionsFixed = max(0, first.corruptions - again.report.corruptions)
        // Consistent now: the corrupt and dirty bits go, as qemu-img's repair clears them (any mode).
        if again.report.corruptions == 0 && again.report.checkErrors == 0 {
            try image.clearCorruptAndDirtyBits()
        }
        return again.report
    }

    init(image: QCowFile, contributors: [CheckContributor]) throws {
        self.image = image
        self.contributors = contributors
        report = CheckReport(filename: image.filename)
        clusterSize = UInt64(image.clusterSize)
        clusterBits = image.clusterBits
        stored = try StoredRefcounts(image: image)
    }

    var needsRebuild: Bool { image.header.incompatibleFeatures.contains(.dirty) }

    mutating func run() throws {
        let fileSize = try image.device.size()
        nbClusters = (fileSize + clusterSize - 1) / clusterSize
        guard nbClusters <= Self.maxClusters else {
            throw QCowError(.unsupported, "file has \(nbClusters) clusters, more than the checker handles (\(Self.maxClusters))",
                            path: image.filename)
        }
        computed = [UInt32](repeating: 0, count: Int(nbClusters))
        report.totalClusters = (image.virtualSize + clusterSize - 1) / clusterSize

        reference(0, clusterSize, "header", at: 0)
        try walkActiveL1()
        try walkSnapshots()
        walkRefcountStructures()
        walkExtensions()
        for contributor in contributors {
            let contribution = try contributor(image)
            for r in contribution.references { reference(r.offset, r.length, r.region, at: r.offset) }
            for f in contribution.findings { note(f.severity, f.region, f.offset, f.message) }
        }
        try compareRefcounts()
    }

    // MARK: - Recording

    mutating func note(_ severity: CheckReport.Finding.Severity, _ region: String, _ offset: UInt64?, _ message: String) {
        switch severity {
        case .corruption: report.corruptionCount += 1
        case .leak: report.leakCount += 1
        case .warning: break
        }
        if report.findings.count < Self.maxFindings {
            report.findings.append(CheckReport.Finding(severity, region: region, offset: offset, message))
        }
    }

    /// Counts one reference to every cluster that [offset, offset+length) touches.
    mutating func reference(_ offset: UInt64, _ length: UInt64, _ region: String, at where_: UInt64) {
        guard length > 0 else { return }
        let (end, overflow) = offset.addingReportingOverflow(length - 1)
        guard !overflow else {
            note(.corruption, region, where_, "\(region) at 0x\(hex(offset)) with length \(length) overflows")
            return
        }
        let first = offset >> UInt64(clusterBits)
        let last = end >> UInt64(clusterBits)
        if last >= nbClusters {
            note(.corruption, region, where_, "\(region) at 0x\(hex(offset)) lies past the end of the file")
        }
        var c = first
        while c <= min(last, nbClusters &- 1) && nbClusters > 0 {
            let i = Int(c)
            if computed[i] < UInt32.max { computed[i] += 1 }
            c += 1
        }
    }

    func hex(_ v: UInt64) -> String { String(v, radix: 16) }
}
