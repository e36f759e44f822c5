#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// What `qemu-img info` reports about one image, gathered without format
/// knowledge leaking into the CLI. Field names follow qemu-img's JSON keys.
public struct ImageInfo: Sendable {
    public var filename: String
    public var format: String
    public var virtualSize: UInt64
    /// Bytes the file occupies on disk (st_blocks * 512), as qemu-img's actual-size.
    public var actualSize: UInt64?
    public var dirtyFlag: Bool
    public var clusterSize: Int?
    public var backingFilename: String?
    public var fullBackingFilename: String?
    public var backingFormat: String?
    public var qcow2: Qcow2Specific?
    public var snapshots: [Snapshot]

    /// The qcow2 part of "format-specific".
    public struct Qcow2Specific: Sendable {
        public var compat: String
        public var compressionType: String
        public var lazyRefcounts: Bool?
        public var refcountBits: Int
        public var corrupt: Bool?
        public var extendedL2: Bool?
        public var dataFile: String?
        public var dataFileRaw: Bool?
    }

    /// Describes `image` (one layer; the CLI walks the chain for --backing-chain).
    public init(_ image: GuestImage) {
        filename = image.filename
        format = image.formatName
        virtualSize = image.virtualSize
        actualSize = Self.allocatedBytes(image.filename)
        dirtyFlag = false
        snapshots = []
        if let q = image as? QCowFile {
            let h = q.header
            clusterSize = q.clusterSize
            dirtyFlag = h.incompatibleFeatures.contains(.dirty)
            backingFilename = h.backingFile
            if let name = h.backingFile {
                fullBackingFilename = ImageOpener.combine(base: q.filename, relative: name)
                backingFormat = h.backingFormat
            }
            snapshots = q.snapshots
            let v3 = h.version >= 3
            qcow2 = Qcow2Specific(
                compat: v3 ? "1.1" : "0.10",
                compressionType: h.compression.name,
                lazyRefcounts: v3 ? h.compatibleFeatures.contains(.lazyRefcounts) : nil,
                refcountBits: h.refcountBits,
                corrupt: v3 ? h.incompatibleFeatures.contains(.corrupt) : nil,
                extendedL2: v3 ? h.extendedL2 : nil,
                dataFile: h.incompatibleFeatures.contains(.externalDataFile) ? h.externalDataFile : nil,
                dataFileRaw: h.incompatibleFeatures.contains(.externalDataFile)
                    ? h.autoclearFeatures.contains(.rawExternalData) : nil)
        }
    }

    static func allocatedBytes(_ path: String) -> UInt64? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return UInt64(st.st_blocks) * 512
    }
}
