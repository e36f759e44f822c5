import Logging

/// An open qcow2 image: its header, L1 table, caches, and (once opened by
/// `ImageOpener`) its backing file. Reading is in `QCowFile+Read.swift`.
public final class QCowFile: GuestImage {
    public let filename: String
    public var formatName: String { "qcow2" }
    public let device: BlockDevice
    /// Where guest data lives: `device`, or the external data file.
    public internal(set) var dataDevice: BlockDevice
    public internal(set) var header: QCowHeader
    public internal(set) var l1: [UInt64]
    public internal(set) var snapshots: [Snapshot]
    /// Why the snapshot table could not be read whole (it runs past the end of the file),
    /// for an image opened read-only or for `check`: `snapshots` then holds none. A writable
    /// open refuses such an image.
    public internal(set) var snapshotTableDamage: QCowError?
    public internal(set) var backing: GuestImage?
    public let writable: Bool
    public var logger: Logger

    public let clusterBits: Int
    public let clusterSize: Int
    /// log2 of the entries of one L2 table.
    public let l2Bits: Int
    public var extendedL2: Bool { header.extendedL2 }
    /// Size of the file when opened (updated by writes), used to reject references past its end.
    public internal(set) var fileSize: UInt64
    public internal(set) var dataFileSize: UInt64

    let l2Cache: TableCache
    /// The last decompressed cluster, for reads that walk a compressed cluster piece by piece.
    var decompressedHost: UInt64?
    var decompressed: [UInt8] = []
    /// Whether the write engine fsyncs at its ordering barriers (data and refcounts
    /// before the tables that point at them). Turn off only for a new file that is
    /// thrown away after a crash — a backup layer written under a temporary name, an
    /// export — where one `flush()` at the end is all the durability needed.
    public var syncBarriers = true
    /// Whether QEMU would take this image for metadata-preallocated (see `QCowFile+Preallocation.swift`).
    var metadataPreallocation: Bool?

    // MARK: - Write state (QCowFile+Write.swift, Refcount/ClusterAllocator.swift)

    /// Called for every guest range written, zeroed or discarded (BitmapStore marks
    /// enabled bitmaps dirty through it). Called after the range's metadata is written.
    public var writeObserver: ((Range<UInt64>, GuestWriteKind) -> Void)?
    /// The refcount structures, loaded on the first allocation.
    var refcountTable: RefcountTable?
    /// Host cluster indices that hold metadata, for the overlap check (nil: rebuild on next use).
    var metadataClusters: Set<UInt64>?
    /// Next free byte in the cluster that compressed clusters are being packed into.
    var compressedTail: UInt64?
    /// Reusable memory for assembling data writes.
    let scratch = ScratchBuffer()
    /// Set when a write failed midway or hit metadata: the image takes no more writes.
    var writeFailure: QCowError?
    /// Unknown autoclear bits are set and not yet cleared (the first write clears them).
    var unknownAutoclearPending = false

    public var virtualSize: UInt64 { header.size }

    /// Opens a qcow2 image on `device`, validating header, extensions, L1 and snapshot table.
    /// The backing file is not opened here, nor the external data file: open images
    /// through `ImageOpener.openQCow` (one file) or `ImageOpener.open` (a chain).
    /// `forCheck` is for `check`: it opens an image without a refcount table (as QEMU's
    /// BDRV_O_CHECK does) and lets `check --repair` open one marked corrupt or dirty for writing.
    init(device: BlockDevice, writable: Bool = false, externalDataDevice: BlockDevice? = nil,
                forCheck: Bool = false, logger: Logger = Logger(label: "qbackup.qcow", factory: { _ in SwiftLogNoOpLogHandler() })) throws {
        self.device = device
        self.filename = device.name
        self.writable = writable
        self.logger = logger
        do {
            let size = try device.size()
            fileSize = size
            header = try Self.decodeHeader(device, fileSize: size)
            try header.validate(fileSize: size, forCheck: forCheck)
            clusterBits = Int(header.clusterBits)
            clusterSize = header.clusterSize
            l2Bits = clusterBits - (header.extendedL2 ? 4 : 3)
            let l2Budget = max(4 << 20, 2 * clusterSize)
            l2Cache = TableCache(budgetBytes: l2Budget)

            if header.l1Size > 0 {
                l1 = decodeTable(try device.readBytes(Int(header.l1Size) * 8, at: header.l1TableOffset, region: "L1 table"))
            } else {
                l1 = []
            }
            snapshots = []
            if let externalDataDevice {
                dataDevice = externalDataDevice
                dataFileSize = try externalDataDevice.size()
            } else {
                dataDevice = device
                dataFileSize = size
            }
            // Read-only and check opens read around a damaged snapshot table (QEMU opens these images too);
            // `check` reports it, the read-only commands warn, the writing commands refuse.
            do {
                snapshots = try readSnapshotTable(tolerant: !writable || forCheck)
            } catch let error as QCowError where error.region == "snapshot table" && (!writable || forCheck) {
                snapshotTableDamage = error
            }
        } catch let error as QCowError {
            throw error.inFile(device.name)
        }
        if writable {
            if header.incompatibleFeatures.contains(.corrupt) && !forCheck {
                throw QCowError(.refused, "image is marked corrupt (\(header.featureName(kind: .incompatible, bit: 1)) set); run 'qbackup check --repair all' first",
                                path: filename, offset: 72, region: "header")
            }
            // A repair opens corrupt or dirty images on purpose: that is what it fixes.
            if !forCheck { try prepareForWriting() }
        }
    }

    /// Releases the file descriptors of this image and its chain.
    public func close() {
        (device as? FileDevice)?.close()
        if dataDevice !== device { (dataDevice as? FileDevice)?.close() }
        backing?.close()
    }

    /// Attaches the opened backing image (done by `ImageOpener`).
    public func attachBacking(_ image: GuestImage?) { backing = image }

    // MARK: - Geometry

    /// Guest bytes covered by one L2 table.
    public var bytesPerL2: UInt64 { UInt64(1) << UInt64(clusterBits + l2Bits) }
    public var l2EntryCount: Int { 1 << l2Bits }
    public var subclusterSize: Int { extendedL2 ? clusterSize / 32 : clusterSize }

    @inline(__always) func isClusterAligned(_ offset: UInt64) -> Bool { offset & UInt64(clusterSize - 1) == 0 }

    // MARK: - Validation of tables read from the file

    /// An L2 reference from the active L1 table is aligned and inside the file
    /// (checked when used, as QEMU does, so `check` can still open the image).
    func validateL2Reference(_ l2Offset: UInt64, l1Index i: Int) throws {
        // Callers that do not know the L1 index pass -1: the error then points at the L2 offset itself.
        let at = i >= 0 ? header.l1TableOffset + UInt64(i) * 8 : l2Offset
        let region = i >= 0 ? "L1 table" : "L2 table"
        guard isClusterAligned(l2Offset) else {
            throw QCowError(.corrupt, "L2 table offset 0x\(String(l2Offset, radix: 16)) is not cluster aligned (L1 index \(i < 0 ? "?" : String(i)))",
                            path: filename, offset: at, region: region)
        }
        guard try isInsideFile(l2Offset, length: UInt64(clusterSize), data: false) else {
            throw QCowError(.corrupt, "L2 table at 0x\(String(l2Offset, radix: 16)) lies past the end of the file (L1 index \(i < 0 ? "?" : String(i)))",
                            path: filename, offset: at, region: region)
        }
    }

    /// Whether `offset` (and, for metadata, `length` bytes from it) lies inside the
    /// image file, or the data file when `data`. Sizes are re-read before saying no,
    /// since the file grows while we write.
    func isInsideFile(_ offset: UInt64, length: UInt64, data: Bool) throws -> Bool {
        func fits(_ size: UInt64) -> Bool { data ? offset < size : offset < size && size - offset >= length }
        if fits(data ? dataFileSize : fileSize) { return true }
        if data { dataFileSize = try dataDevice.size() } else { fileSize = try device.size() }
        return fits(data ? dataFileSize : fileSize)
    }

    /// The snapshot table. `tolerant` keeps a snapshot whose L1 table is invalid (`Snapshot.l1Problem`:
    /// the checker reports it, nothing reads it); otherwise such a snapshot is refused.
    /// What is wrong with `snap`'s L1 table reference (QEMU's qcow2_validate_table), or nil.
    func l1Problem(of snap: Snapshot) -> String? {
        let at = "0x" + String(snap.l1TableOffset, radix: 16)
        if UInt64(snap.l1Size) * 8 > QCowHeader.Limits.maxL1Bytes { return "\(snap.l1Size) entries is too many" }
        if !isClusterAligned(snap.l1TableOffset) { return "offset \(at) is not cluster aligned" }
        if snap.l1TableOffset > fileSize || UInt64(snap.l1Size) * 8 > fileSize - snap.l1TableOffset {
            return "\(snap.l1Size) entries at \(at) run past the end of the file"
        }
        return nil
    }

    func readSnapshotTable(tolerant: Bool) throws -> [Snapshot] {
        guard header.nbSnapshots > 0 else { return [] }
        // Each entry is at least 40 bytes; read what the file has, up to QEMU's table limit.
        let maxBytes = min(Snapshot.maxTableBytes, fileSize - min(fileSize, header.snapshotsOffset))
        let minimum = UInt64(header.nbSnapshots) * 40
        guard minimum <= maxBytes else {
            throw QCowError(.truncated, "snapshot table of \(header.nbSnapshots) entries runs past the end of the file",
                            offset: header.snapshotsOffset, region: "snapshot table")
        }
        // Read in growing chunks, so a small table costs one small read.
        var want = min(maxBytes, max(minimum * 2, 4096))
        while true {
            let bytes = try device.readBytes(Int(want), at: header.snapshotsOffset, region: "snapshot table")
            var r = ByteReader(bytes, baseOffset: header.snapshotsOffset, region: "snapshot table")
            do {
                let table = try Snapshot.decodeTable(&r, count: Int(header.nbSnapshots))
                for (i, snap) in table.enumerated() where !tolerant {
                    if let problem = l1Problem(of: snap) {
                        throw QCowError(.corrupt, "snapshot \(i) ('\(snap.name)') has an invalid L1 table: \(problem)",
                                        offset: header.snapshotsOffset, region: "snapshot table")
                    }
                }
                return table
            } catch let error as QCowError where error.code == .truncated && want < maxBytes {
                want = min(maxBytes, want * 4)
            }
        }
    }
}
