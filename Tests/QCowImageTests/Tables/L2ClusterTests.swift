import Foundation
import QCowImage
import Testing
import TestSupport

/// The one L2-entry classifier: what each descriptor decodes to, and the read
/// paths that follow it agree with QEMU on images where the old per-path
/// decoding did not.
@Suite struct L2ClusterTests {
    static let bits = 16  // 64 KiB clusters
    static let sub = 2048  // their subclusters

    func decode(_ entry: UInt64, _ bitmap: UInt64 = 0, extended: Bool = false, external: Bool = false) -> L2Cluster {
        L2Cluster(entry: entry, bitmap: bitmap, clusterBits: Self.bits, extendedL2: extended, externalDataFile: external)
    }

    @Test func standardDescriptors() {
        let data = decode(L2Entry.copiedFlag | 0x5_0000)
        #expect(data.kind == .normal)
        #expect(data.host == 0x5_0000)
        #expect(data.dataUnits == 1 && data.zeroUnits == 0)
        #expect(data.mapping(unit: 0, unitSize: 65536) == .data(host: 0x5_0000))
        #expect(data.problems.isEmpty)

        #expect(decode(0).kind == .unallocated)
        #expect(decode(0).mapping(unit: 0, unitSize: 65536) == .unallocated)
        #expect(decode(1).kind == .zeroPlain)
        #expect(decode(1).mapping(unit: 0, unitSize: 65536) == .zero(host: nil))
        let prealloc = decode(0x7_0000 | 1)
        #expect(prealloc.kind == .zeroAllocated)
        #expect(prealloc.mapping(unit: 0, unitSize: 65536) == .zero(host: 0x7_0000))
        #expect(!prealloc.containsData)

        let unaligned = decode(L2Entry.copiedFlag | 0x5_2a00)
        #expect(unaligned.unalignedHost)
        #expect(unaligned.problems == [.unalignedHost(0x5_2a00)])
        #expect(decode(0x5_0000 | 0x100).problems == [.reservedBits(0x100)])
    }

    @Test func compressedDescriptor() {
        let entry = L2Entry.compressed(host: 0x12_3456, sectors: 3, clusterBits: Self.bits)
        let c = decode(entry.rawValue)
        #expect(c.kind == .compressed(host: 0x12_3456, sectors: 3))
        #expect(c.host == nil && c.holdsHostClusters)
        #expect(c.mapping(unit: 0, unitSize: 65536) == .compressed(host: 0x12_3456, length: 3 * 512 - 0x56))
        #expect(decode(entry.rawValue | L2Entry.copiedFlag).problems == [.compressedCopied])
        #expect(decode(entry.rawValue, 1, extended: true).problems == [.compressedBitmap])
    }

    @Test func extendedDescriptors() {
        // Subcluster 0 data, 1 zero, 2 unallocated (falls through), in a cluster at 0x5_0000.
        let c = decode(0x5_0000, L2Bitmap(allocated: 0b001, zero: 0b010).rawValue, extended: true)
        #expect(c.kind == .normal)
        #expect(c.mapping(unit: 0, unitSize: Self.sub) == .data(host: 0x5_0000))
        #expect(c.mapping(unit: 1, unitSize: Self.sub) == .zero(host: 0x5_0000 + 2048))
        #expect(c.mapping(unit: 2, unitSize: Self.sub) == .unallocated)
        #expect(c.invalidBitmap == nil && c.problems.isEmpty)

        let noHost = decode(0, L2Bitmap(allocated: 0, zero: 0b100).rawValue, extended: true)
        #expect(noHost.kind == .unallocated)
        #expect(noHost.mapping(unit: 2, unitSize: Self.sub) == .zero(host: nil))
        // The zero flag of standard L2 means nothing here: bit 0 is reserved.
        #expect(decode(1, 0, extended: true).kind == .unallocated)
        #expect(decode(1, 0, extended: true).problems == [.extendedZeroFlag])

        #expect(decode(0x5_0000, L2Bitmap(allocated: 0b1000, zero: 0b1000).rawValue, extended: true).invalidBitmap
            == .allocatedAndZero(0b1000))
        #expect(decode(0, L2Bitmap(allocated: 1, zero: 0).rawValue, extended: true).invalidBitmap == .allocatedWithoutHost)
        // A preallocated cluster with no allocated subcluster holds no data (QEMU check's "contains data").
        #expect(!decode(0x5_0000, 0, extended: true).containsData)
    }

    @Test func externalDataFileOffsetZero() {
        // QEMU: offset 0 is a valid data offset in an external data file, told apart by COPIED.
        #expect(decode(L2Entry.copiedFlag, external: true).kind == .normal)
        #expect(decode(L2Entry.copiedFlag, external: true).mapping(unit: 0, unitSize: 65536) == .data(host: 0))
        #expect(decode(L2Entry.copiedFlag, external: false).kind == .unallocated)
        #expect(decode(0, external: true).kind == .unallocated)
    }

    /// QEMU puts guest cluster 0 at byte 0 of an external data file (L2 entry = COPIED
    /// alone); the reader used to take it for unallocated and read zeros.
    @Test(arguments: ["data_file_raw=off", "data_file_raw=on"])
    func readsClusterZeroOfExternalDataFile(_ raw: String) throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "data_file=\(dir.file("a.data")),\(raw)", image, "1M")
        try Tools.qemuIO(image, format: "qcow2", ["write -P 0x11 0 64k", "write -P 0x22 128k 3000"])
        try Tools.qemuImg("convert", "-O", "raw", image, dir.file("ref.raw"))
        let reference = try Data.contents(of: dir.file("ref.raw"))
        let opened = try ImageOpener.open(image)
        defer { opened.close() }
        var ours = [UInt8](repeating: 0xee, count: reference.count)
        try ours.withUnsafeMutableBytes { try opened.read(into: $0, at: 0) }
        #expect(ours[0] == 0x11)
        #expect(Data(ours) == reference)
    }

    /// A subcluster marked both allocated and zero makes the whole cluster invalid for
    /// QEMU (QCOW2_SUBCLUSTER_INVALID): a read of another subcluster of it fails too.
    @Test func invalidSubclusterBitmapRefusesTheWholeCluster() throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,extended_l2=on", image, "1M")
        try Tools.qemuIO(image, format: "qcow2", ["write -P 0x11 0 64k"])
        let l1 = try peek(image, at: 40, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        let l2 = try peek(image, at: l1, count: 8).reduce(0) { $0 << 8 | UInt64($1) } & L1Entry.offsetMask
        // Subcluster 5: allocated (already) and zero.
        try poke(image, at: l2 + 8, be(L2Bitmap(allocated: UInt32.max, zero: 1 << 5).rawValue))
        let qemu = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "read -P 0x11 0 2k", image])
        #expect(qemu.stdout.contains("Input/output error") || qemu.stderr.contains("Input/output error"),
                "qemu-io: \(qemu.stdout) \(qemu.stderr)")
        let opened = try ImageOpener.open(image)
        defer { opened.close() }
        var buffer = [UInt8](repeating: 0, count: 2048)
        let error = #expect(throws: QCowError.self) { try buffer.withUnsafeMutableBytes { try opened.read(into: $0, at: 0) } }
        #expect(error?.code == .corrupt)
        #expect(error?.offset == l2 + 8)
        #expect(error?.region == "L2 table")
    }
}
