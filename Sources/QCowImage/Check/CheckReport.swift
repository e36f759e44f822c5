/// What `check` found: counts in qemu-img check's terms, and each finding
/// with the region and file offset it is about. Only a failure to read throws;
/// everything else lands here.
public struct CheckReport: Sendable {
    /// One problem (or note) found by the checker.
    public struct Finding: Sendable, Equatable {
        public enum Severity: String, Sendable { case corruption, leak, warning }
        public var severity: Severity
        public var region: String
        public var offset: UInt64?
        public var message: String
        public init(_ severity: Severity, region: String, offset: UInt64?, _ message: String) {
            self.severity = severity
            self.region = region
            self.offset = offset
            self.message = message
        }
    }

    public var filename: String
    public var findings: [Finding] = []
    /// Problems that stopped part of the check (an unreadable table).
    public var checkErrors = 0
    /// Bitmaps a repair removed because their metadata was broken (filled in by the CLI).
    public var droppedBitmaps: [String] = []
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: UInt64 = 0
    public var totalClusters: UInt64 = 0
    public var allocatedClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0

    /// Every corruption found (findings beyond `QCowChecker.maxFindings` are counted, not kept).
    public var corruptionCount = 0
    /// Every leaked cluster found.
    public var leakCount = 0
    public var corruptions: Int { corruptionCount }
    public var leaks: Int { leakCount }

    /// qemu-img check's exit status: 0 clean, 1 check incomplete, 2 corruptions, 3 only leaks.
    public var exitStatus: Int32 {
        if checkErrors > 0 { return 1 }
        if corruptions > 0 { return 2 }
        if leaks > 0 { return 3 }
        return 0
    }

    public init(filename: String) { self.filename = filename }

}

/// Host clusters owned by metadata that QCowImage does not know (bitmaps),
/// and problems with it; BitmapStore fills this in for the checker.
public struct CheckContribution: Sendable {
    /// A byte range of the image file and what owns it.
    public struct Reference: Sendable {
        public var offset: UInt64
        public var length: UInt64
        public var region: String
        public init(offset: UInt64, length: UInt64, region: String) {
            self.offset = offset
            self.length = length
            self.region = region
        }
    }
    public var references: [Reference]
    public var findings: [CheckReport.Finding]
    public init(references: [Reference] = [], findings: [CheckReport.Finding] = []) {
        self.references = references
        self.findings = findings
    }
}

/// A provider of extra references for the checker (e.g. the bitmaps of an image).
public typealias CheckContributor = (QCowFile) throws -> CheckContribution
