import BackupChain
import Foundation
@testable import LiveSource
import QCowImage
import Testing
import TestSupport

/// NBDSource against real `qemu-nbd -r -B NAME` exports of images made by qemu-img and qemu-io:
/// the data equals qemu-img convert's, the dirty extents equal nbdinfo --map's.
@Suite struct NBDSourceTests {
    /// A qcow2 disk with data written before and after bitmap `b0` was added (so b0 marks the later writes).
    static func makeDisk(_ dir: TempDir, size: String, before: [String], after: [String]) throws -> String {
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, size)
        if !before.isEmpty { try Tools.qemuIO(disk, format: "qcow2", before) }
        try Tools.qemuImg("bitmap", "--add", disk, "b0")
        if !after.isEmpty { try Tools.qemuIO(disk, format: "qcow2", after) }
        return disk
    }

    static func uri(_ server: QemuNBD) -> String { "nbd+unix:///?socket=\(server.socket)" }

    /// Reads the whole export through the source, the way the layer writer does (4 MiB chunks).
    static func readAll(_ source: NBDSource) throws -> Data {
        var out = Data(count: Int(source.virtualSize))
        try out.withUnsafeMutableBytes { raw in
            var offset = 0
            while offset < raw.count {
                let n = min(4 << 20, raw.count - offset)
                try source.read(into: UnsafeMutableRawBufferPointer(rebasing: raw[offset..<(offset + n)]), at: UInt64(offset))
                offset += n
            }
        }
        return out
    }

    @Test func dataAndDirtyExtentsMatchQEMU() throws {
        let dir = TempDir("nbdsrc")
        let disk = try Self.makeDisk(dir, size: "24M",
                                     before: ["write -P 0x11 0 1M", "write -P 0x22 5M 3M", "write -z 9M 1M"],
                                     after: ["write -P 0x33 512k 64k", "write -P 0x44 7M 2M", "write -P 0x55 20M 4k",
                                             "write -z 23M 64k"])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir)
        defer { server.stop() }
        // QEMU's map first: qemu-nbd serves one client at a time.
        let map = try server.dirtyMap(bitmap: "b0").filter(\.dirty)
        let source = try NBDSource(uri: Self.uri(server), tracking: .init(name: "b0", exported: "b0"))
        defer { source.close() }
        #expect(source.virtualSize == 24 << 20)
        let expected = try Data.contents(of: raw)
        #expect(try Self.readAll(source) == expected)

        // Dirty extents: the same as QEMU's own client sees.
        var dirty: [QemuNBD.Extent] = []
        try source.forEachDirtyExtent("b0") { dirty.append(.init(start: $0.lowerBound, length: UInt64($0.count), dirty: true)) }
        #expect(dirty == map)
        #expect(!dirty.isEmpty)

        // Block status: every range not reported as data reads as zeros; the data covers every non-zero byte.
        var offset: UInt64 = 0
        var dataBytes: UInt64 = 0
        while offset < source.virtualSize {
            let status = try source.blockStatus(at: offset, maxLength: source.virtualSize - offset)
            #expect(status.start == offset && status.length > 0)
            if status.kind == .data {
                dataBytes += status.length
            } else {
                let slice = expected[Int(offset)..<Int(offset + status.length)]
                #expect(slice.allSatisfy { $0 == 0 }, "non-zero bytes in a \(status.kind) extent at \(offset)")
            }
            offset += status.length
        }
        #expect(offset == source.virtualSize)
        #expect(dataBytes >= 5 << 20 && dataBytes < 6 << 20)
        #expect(try source.bitmapState("b0") == .ready(granularity: source.connection.minBlock))
        #expect(try source.bitmapState("other") == .missing)
    }

    /// A disk larger than 4 GiB: block-status replies carry 32-bit lengths, so the source
    /// must loop, and extents past 4 GiB must land where QEMU says.
    @Test func extentsBeyondFourGiB() throws {
        let dir = TempDir("nbdsrc-big")
        let disk = try Self.makeDisk(dir, size: "9G", before: ["write -P 0x61 4G 64k"],
                                     after: ["write -P 0x62 1M 64k", "write -P 0x63 6G 128k", "write -P 0x64 9215M 1M"])
        let server = try QemuNBD(image: disk, bitmap: "b0", directory: dir)
        defer { server.stop() }
        let map = try server.dirtyMap(bitmap: "b0").filter(\.dirty)
        let source = try NBDSource(uri: Self.uri(server), tracking: .init(name: "b0", exported: "b0"))
        defer { source.close() }
        var dirty: [QemuNBD.Extent] = []
        try source.forEachDirtyExtent("b0") { dirty.append(.init(start: $0.lowerBound, length: UInt64($0.count), dirty: true)) }
        #expect(dirty == map)
        #expect(dirty.map(\.start) == [1 << 20, 6 << 30, 9215 << 20])

        var data: [Range<UInt64>] = []
        var offset: UInt64 = 0
        while offset < source.virtualSize {
            let status = try source.blockStatus(at: offset, maxLength: source.virtualSize - offset)
            if status.kind == .data {
                if let last = data.last, last.upperBound == offset { data[data.count - 1] = last.lowerBound..<(offset + status.length) }
                else { data.append(offset..<(offset + status.length)) }
            }
            offset += status.length
        }
        let mib: UInt64 = 1 << 20
        let gib: UInt64 = 1 << 30
        let expected: [Range<UInt64>] = [mib..<(mib + 65536), (4 * gib)..<(4 * gib + 65536),
                                         (6 * gib)..<(6 * gib + 131072), (9215 * mib)..<(9216 * mib)]
        #expect(data == expected)
        var buffer = [UInt8](repeating: 0, count: 65536)
        try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 6 << 30) }
        #expect(buffer.allSatisfy { $0 == 0x63 })
    }

    /// Reads after `willRead` (the copy plan) come from the read-ahead, whatever their sizes,
    /// also when the caller skips part of the plan, reads outside it or goes back; every byte
    /// equals qemu-img convert's.
    @Test func readAheadFollowsThePlan() throws {
        let dir = TempDir("nbdsrc-ahead")
        // A different pattern every 64 KiB of the data, so a byte from the wrong offset shows.
        let regions: [(start: Int, length: Int)] = [(0, 3 << 20), (5 << 20, 4 << 20), (10 << 20, 1 << 20),
                                                   (12 << 20, 64 << 10), (20 << 20, 4 << 20)]
        var writes: [String] = []
        for region in regions {
            for offset in stride(from: region.start, to: region.start + region.length, by: 65536) {
                let pattern: Int = (offset >> 16) % 251 + 1
                writes.append("write -P \(pattern) \(offset) 64k")
            }
        }
        let disk = try Self.makeDisk(dir, size: "24M", before: writes + ["write -P 0xfe 1540k 4k"], after: [])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let expected = try Data.contents(of: raw)
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        defer { server.stop() }
        let source = try NBDSource(uri: Self.uri(server), tracking: nil)
        defer { source.close() }
        let mib = 1 << 20
        let plan: [Range<UInt64>] = regions.filter { $0.start != 10 << 20 }
            .map { UInt64($0.start)..<UInt64($0.start + $0.length) }
        try source.connection.willRead(plan)
        func check(_ offset: Int, _ count: Int, sourceLocation: SourceLocation = #_sourceLocation) throws {
            var buffer = [UInt8](repeating: 0xee, count: count)
            try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: UInt64(offset)) }
            // Compared outside #expect: rendering megabytes of operands takes minutes.
            if Data(buffer) != expected[offset..<(offset + count)] {
                Issue.record("read of \(count) at \(offset) differs from qemu-img convert's bytes", sourceLocation: sourceLocation)
            }
        }
        try check(0, 300 << 10)                   // part of a request
        try check(300 << 10, (3 * mib) - (300 << 10))  // the rest of the range, across requests
        try check(7 * mib, mib)                   // 5M..7M of the plan skipped
        try check(10 * mib, mib)                  // outside the plan
        try check(12 * mib, 65536)
        try check(20 * mib, 4 * mib)              // one read over four requests
        try check(mib, 4096)                      // back before the window
        try check(0, 24 * mib)                    // the plan is used up: everything straight
        // A new plan replaces the old one; an odd-sized range at the end of the disk.
        try source.connection.willRead([UInt64(23 * mib)..<UInt64(24 * mib)])
        try check(23 * mib, mib)

        // The connection dropping while reads are ahead: an error, also for later calls (a window
        // smaller than the plan, so that not everything is read before the server goes).
        source.connection.readAheadBytes = UInt64(4 * mib)
        try source.connection.willRead([0..<UInt64(24 * mib)])
        try check(0, mib)
        server.stop()
        var buffer = [UInt8](repeating: 0, count: 4 * mib)
        #expect(throws: LiveError.self) {
            for offset in stride(from: mib, to: 24 * mib, by: 4 * mib) {
                try buffer.withUnsafeMutableBytes {
                    try source.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<min(4 * mib, 24 * mib - offset)]),
                                    at: UInt64(offset))
                }
            }
        }
        #expect(throws: LiveError.self) {
            try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 0) }
        }
    }

    /// The copier takes each chunk of its plan from the read-ahead by exchanging buffers, not by
    /// copying bytes: every chunk the plan cuts (4 MiB, or shorter at a range's ends) is one
    /// segment handed over whole, also with compression (buffers of two chunks), and both
    /// images equal the disk (qemu-img compare) and pass qemu-img check.
    @Test func theCopierTakesWholeChunksFromTheReadAhead() throws {
        let dir = TempDir("nbdsrc-exchange")
        // Data in ranges that start and end off the 4 MiB grid, a cluster of zero bytes inside one.
        let writes = ["write -P 0x21 1M 6M", "write -P 0 3M 64k", "write -P 0x22 9M 64k", "write -P 0x23 12M 9M",
                      "write -P 0x24 30M 2M"]
        let disk = try Self.makeDisk(dir, size: "32M", before: writes, after: [])
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir, shared: 2)
        defer { server.stop() }
        for compress in [false, true] {
            let source = try NBDSource(uri: Self.uri(server), tracking: nil, timeout: 10)
            defer { source.close() }
            let plan = try CopyPlan.data(of: source, grain: 65536)
            let chunk = UInt64(CopyOptions(zeros: .hide).chunkBytes)
            let chunks = plan.ranges.reduce(0) { count, range in
                count + Int((range.upperBound - 1) / chunk - range.lowerBound / chunk) + 1
            }
            #expect(plan.ranges.count == 4 && chunks == 7, "\(plan.ranges)")
            let path = dir.file("copy-\(compress).qcow2")
            var options = QCowCreateOptions(size: source.virtualSize)
            options.compression = .zstd
            let out = try QCowCreator.create(at: path, options: options)
            try Copier.copy(plan, from: source, to: .image(out), options: CopyOptions(zeros: .hide, compress: compress))
            try out.flush()
            out.close()
            let stats = source.connection.readAheadStats
            #expect(stats?.connections == 2)
            #expect(stats?.exchanged == chunks, "compress \(compress): \(String(describing: stats))")
            try Tools.qemuImg("compare", "-q", "-f", "qcow2", "-F", "qcow2", path, disk)
            try Tools.qemuImg("check", "-q", path)
        }
    }

    /// Waits (up to 30 s) until `condition` holds; false if it never did.
    static func eventually(_ condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(30)
        while !condition() {
            guard Date() < deadline else { return false }
            usleep(5_000)
        }
        return true
    }

    /// The read-ahead reads on its own threads, on as many connections as the server lets in
    /// when the export allows multi-conn (qemu-nbd -e 2: 2 clients; the third is kept waiting,
    /// and the read-ahead goes on without it after a few seconds, not the read timeout), keeps
    /// several requests in flight, fills its window without the caller reading and stops there
    /// (its memory bound). What it read before the server went is served afterwards, byte-exact.
    @Test func readAheadUsesTwoConnectionsAndReadsWithoutTheCaller() throws {
        let dir = TempDir("nbdsrc-multi")
        let mib = 1 << 20
        let disk = try Self.makeDisk(dir, size: "40M", before: (0..<40).map { "write -P \($0 + 1) \($0)M 1M" }, after: [])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let expected = try Data.contents(of: raw)
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir, shared: 2)
        defer { server.stop() }
        let source = try NBDSource(uri: Self.uri(server), tracking: nil, timeout: 30)
        defer { source.close() }
        #expect(source.connection.canMultiConn)
        #expect(server.openSockets == 2)  // listening + this client
        source.connection.readAheadBytes = UInt64(16 * mib)
        let started = Date()
        try source.connection.willRead([0..<UInt64(40 * mib)], chunk: mib, bufferSize: mib)
        let waited = Date().timeIntervalSince(started)
        #expect(waited < NBDConnection.extraHandshake + 2, "willRead took \(waited) s")
        #expect(source.connection.readAheadStats?.connections == 2)
        #expect(server.openSockets == 3)  // a second client
        // Nobody reads: the window (16 segments of 1 MiB, 8 requests each) fills anyway, and no further.
        #expect(Self.eventually { source.connection.readAheadStats?.ready == 16 })
        usleep(200_000)
        let stats = source.connection.readAheadStats
        #expect(stats?.ready == 16)
        #expect((stats?.peakInFlight ?? 0) >= 2 && (stats?.peakInFlight ?? 0) <= 16 * 8)

        server.stop()
        var buffer = [UInt8](repeating: 0xee, count: 16 * mib)
        try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 0) }
        if Data(buffer) != expected[0..<(16 * mib)] {
            Issue.record("the first 16 MiB, read ahead before the server went, differ from qemu-img convert's bytes")
        }
        #expect(throws: LiveError.self) {
            try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: UInt64(16 * mib)) }
        }
    }

    /// A server that lets enough clients in (qemu-nbd -e 8) gets four connections, as from
    /// nbdcopy: QEMU's server works on at most 16 requests of one client at a time. The plan
    /// read through them equals qemu-img convert's bytes.
    @Test func readAheadUsesFourConnections() throws {
        let dir = TempDir("nbdsrc-four")
        let disk = try Self.makeDisk(dir, size: "24M", before: (0..<24).map { "write -P \($0 + 0x31) \($0)M 1M" }, after: [])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir, shared: 8)
        defer { server.stop() }
        let source = try NBDSource(uri: Self.uri(server), tracking: nil, timeout: 10)
        defer { source.close() }
        try source.connection.willRead([0..<(24 << 20)], chunk: 4 << 20, bufferSize: 4 << 20)
        #expect(source.connection.readAheadStats?.connections == 4)
        #expect(server.openSockets == 5)  // listening + 4 clients
        if try Self.readAll(source) != Data.contents(of: raw) {
            Issue.record("the plan read through four connections differs from qemu-img convert's bytes")
        }
    }

    /// Without multi-conn (qemu-nbd's default -e 1 lets one client in) the read-ahead stays
    /// on the one connection, and a whole plan read through it equals qemu-img convert's bytes.
    @Test func readAheadWithoutMultiConnUsesOneConnection() throws {
        let dir = TempDir("nbdsrc-single")
        let disk = try Self.makeDisk(dir, size: "20M", before: (0..<20).map { "write -P \($0 + 0x41) \($0)M 1M" }, after: [])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        defer { server.stop() }
        let source = try NBDSource(uri: Self.uri(server), tracking: nil, timeout: 10)
        defer { source.close() }
        #expect(!source.connection.canMultiConn)
        source.connection.readAheadBytes = 4 << 20
        try source.connection.willRead([0..<(20 << 20)])
        #expect(source.connection.readAheadStats?.connections == 1)
        #expect(server.openSockets == 2)
        if try Self.readAll(source) != Data.contents(of: raw) {
            Issue.record("the plan read through one connection differs from qemu-img convert's bytes")
        }
    }

    /// Over TLS on TCP with a client certificate (nbds://127.0.0.1:PORT/?tls-certificates=DIR,
    /// the server verifying peers and allowing multi-conn) the read-ahead's second connection
    /// makes its own TLS handshake with the same certificates: the server sees 2 clients and
    /// the plan read through both equals qemu-img convert's bytes.
    @Test func readAheadOverTLSOnTCPUsesTwoConnections() throws {
        let dir = TempDir("nbdsrc-tls-tcp")
        let disk = try Self.makeDisk(dir, size: "20M", before: (0..<20).map { "write -P \($0 + 0x61) \($0)M 1M" }, after: [])
        let raw = dir.file("disk.raw")
        try Tools.qemuImg("convert", "-f", "qcow2", "-O", "raw", disk, raw)
        let certificates = try TLSCertificates.make(in: dir, client: true)
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir, shared: 2, tls: certificates, verifyPeer: true,
                                 tcp: true)
        defer { server.stop() }
        let port = try #require(server.port)
        let source = try NBDSource(uri: "nbds://127.0.0.1:\(port)/?tls-certificates=\(certificates)", tracking: nil, timeout: 10)
        defer { source.close() }
        #expect(source.connection.canMultiConn)
        source.connection.readAheadBytes = 4 << 20
        try source.connection.willRead([0..<(20 << 20)])
        #expect(source.connection.readAheadStats?.connections == 2)
        #expect(server.openSockets == 3)  // listening + 2 clients
        if try Self.readAll(source) != Data.contents(of: raw) {
            Issue.record("the plan read over TLS on two TCP connections differs from qemu-img convert's bytes")
        }
    }

    @Test func refusesABitmapTheExportLacks() throws {
        let dir = TempDir("nbdsrc-nobitmap")
        let disk = try Self.makeDisk(dir, size: "4M", before: [], after: [])
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        defer { server.stop() }
        let error = #expect(throws: LiveError.self) {
            try NBDSource(uri: Self.uri(server), tracking: .init(name: "b0", exported: "b0"))
        }
        #expect(error?.errorCode == .refused)
        #expect(error?.message.contains("qemu:dirty-bitmap:b0") == true)
    }

    @Test func failsClearlyWhenNothingListens() throws {
        let dir = TempDir("nbdsrc-none")
        let error = #expect(throws: LiveError.self) {
            try NBDSource(uri: "nbd+unix:///?socket=\(dir.file("absent.sock"))", tracking: nil, timeout: 5)
        }
        #expect(error?.errorCode == .io)
    }

    /// The connection dropping mid-backup is an error (not a hang, not a crash), and later calls fail cleanly.
    @Test func droppedConnectionIsAnError() throws {
        let dir = TempDir("nbdsrc-drop")
        let disk = try Self.makeDisk(dir, size: "8M", before: ["write -P 0x71 0 8M"], after: [])
        let server = try QemuNBD(image: disk, bitmap: nil, directory: dir)
        let source = try NBDSource(uri: Self.uri(server), tracking: nil, timeout: 5)
        defer { source.close() }
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 0) }
        server.stop()
        #expect(throws: LiveError.self) {
            try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 1 << 20) }
        }
        #expect(throws: LiveError.self) {
            try buffer.withUnsafeMutableBytes { try source.read(into: $0, at: 2 << 20) }
        }
    }
}
