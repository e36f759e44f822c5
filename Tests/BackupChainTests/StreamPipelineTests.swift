@testable import BackupChain
import CLZ4
import Foundation
import Testing
import TestSupport

/// The replication stream's pipe is read ahead and written behind on threads of their own
/// (issue 16's first copy was slower than rsync with the pipe idle while a record was
/// compressed or written), received layers go to the disk past the page cache, and lz4 frames
/// leave out the content checksum the record's CRC and the chunk sha256 already cover.
@Suite struct StreamPipelineTests {
    /// Bytes whose every 8 bytes differ, so a byte lost, doubled or out of order shows.
    static func pattern(_ count: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededRandom(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        bytes.withUnsafeMutableBytes { p in
            for i in stride(from: 0, to: count - 7, by: 8) { p.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
        }
        return bytes
    }

    static func makePipe() throws -> (read: Int32, write: Int32) {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw POSIXError(.EMFILE) }
        return (fds[0], fds[1])
    }

    /// Runs `body` on a thread of its own; `wait()` returns what it threw.
    final class Background: @unchecked Sendable {
        private let done = DispatchSemaphore(value: 0)
        private var failure: Error?
        init(_ body: @escaping @Sendable () throws -> Void) {
            Thread.detachNewThread {
                do { try body() } catch { self.failure = error }
                self.done.signal()
            }
        }
        func wait(seconds: Double = 60) throws {
            #expect(done.wait(timeout: .now() + seconds) == .success, "the other thread did not finish")
            if let failure { throw failure }
        }
    }

    @Test func theReadAheadDeliversEveryByteInOrderThroughSmallAndLargeReads() throws {
        let data = Self.pattern(21 << 20, seed: 3)
        let pipe = try Self.makePipe()
        let writer = Background {
            defer { close(pipe.write) }
            var rng = SeededRandom(seed: 4)
            var at = 0
            try data.withUnsafeBytes { all in
                while at < all.count {
                    let n = min(Int(rng.next() % (3 << 20)) + 1, all.count - at)
                    try DescriptorStream(fd: pipe.write, name: "pipe").write(UnsafeRawBufferPointer(rebasing: all[at..<(at + n)]))
                    at += n
                }
            }
        }
        defer { close(pipe.read) }
        let ahead = try ReadAheadStream(DescriptorStream(fd: pipe.read, name: "pipe"), capacity: 1 << 20)
        var got: [UInt8] = []
        var rng = SeededRandom(seed: 5)
        var buffer = [UInt8](repeating: 0, count: 5 << 20)
        while true {
            let want = Int(rng.next() % UInt64(buffer.count)) + 1
            let n = try buffer.withUnsafeMutableBytes { try ahead.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<want])) }
            if n == 0 { break }
            got += buffer[0..<n]
        }
        ahead.stop()
        try writer.wait()
        #expect(got.count == data.count)
        #expect(got == data)
    }

    @Test func stopEndsAReadAheadWaitingOnAPipeNobodyWritesTo() throws {
        let pipe = try Self.makePipe()
        defer { close(pipe.read); close(pipe.write) }
        let ahead = try ReadAheadStream(DescriptorStream(fd: pipe.read, name: "pipe"))
        var one: UInt8 = 7
        #expect(write(pipe.write, &one, 1) == 1)
        var byte: UInt8 = 0
        #expect(try withUnsafeMutableBytes(of: &byte) { try ahead.read(into: $0) } == 1 && byte == 7)
        // The thread now waits for bytes that never come; stop must not wait with it.
        let stopped = Background { ahead.stop() }
        try stopped.wait(seconds: 10)
    }

    @Test func aFailedReadIsThrownAsTheStreamsError() throws {
        let dir = TempDir("qbackup-read-ahead")
        let fd = open(dir.path, O_RDONLY | O_DIRECTORY)
        defer { close(fd) }
        let ahead = try ReadAheadStream(DescriptorStream(fd: fd, name: "stdin"))
        var buffer = [UInt8](repeating: 0, count: 16)
        #expect(throws: ChainError.self) { try buffer.withUnsafeMutableBytes { try ahead.read(into: $0) } }
        do {
            _ = try buffer.withUnsafeMutableBytes { try ahead.read(into: $0) }
            Issue.record("a second read after the failure succeeded")
        } catch {
            #expect("\(error)".contains("cannot read the stream from stdin"), "\(error)")
        }
    }

    @Test func theWriteBehindKeepsTheOrderAndFinishWaitsForEveryByte() throws {
        let data = Self.pattern(19 << 20, seed: 6)
        let pipe = try Self.makePipe()
        final class Sink: @unchecked Sendable { var bytes: [UInt8] = [] }
        let sink = Sink()
        let reader = Background {
            defer { close(pipe.read) }
            var buffer = [UInt8](repeating: 0, count: 200_000)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(pipe.read, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                sink.bytes += buffer[0..<n]
                usleep(200)  // a slow reader: the ring fills and `write` waits for room
            }
        }
        let behind = WriteBehindStream(DescriptorStream(fd: pipe.write, name: "pipe"), capacity: 1 << 20)
        var rng = SeededRandom(seed: 7)
        var at = 0
        try data.withUnsafeBytes { all in
            while at < all.count {
                let n = min(Int(rng.next() % (5 << 20)) + 1, all.count - at)
                try behind.write(UnsafeRawBufferPointer(rebasing: all[at..<(at + n)]))
                at += n
            }
        }
        try behind.finish()
        close(pipe.write)
        try reader.wait()
        #expect(sink.bytes.count == data.count)
        #expect(sink.bytes == data)
    }

    @Test func aReaderThatWentAwayIsThrownByTheNextWriteOrByFinish() throws {
        signal(SIGPIPE, SIG_IGN)
        let pipe = try Self.makePipe()
        close(pipe.read)
        defer { close(pipe.write) }
        let behind = WriteBehindStream(DescriptorStream(fd: pipe.write, name: "ssh"), capacity: 1 << 20)
        let chunk = Self.pattern(1 << 20, seed: 8)
        var thrown: Error?
        do {
            for _ in 0..<64 { try chunk.withUnsafeBytes { try behind.write($0) } }
            try behind.finish()
        } catch {
            thrown = error
        }
        // Replicator tells a broken pipe by this prefix (the other side's reason then explains it).
        #expect(thrown.map { "\($0)".contains(DescriptorStream.writeFailure + " to ssh") } == true, "\(String(describing: thrown))")
        #expect(throws: ChainError.self) { try behind.finish() }
    }

    /// Which of a file's pages are in the page cache (mincore over a mapping that touches none).
    static func cachedFraction(_ path: String) throws -> Double {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { throw POSIXError(.ENOENT) }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return 0 }
        let size = Int(st.st_size)
        guard let map = mmap(nil, size, PROT_READ, MAP_SHARED, fd, 0), map != MAP_FAILED else { throw POSIXError(.ENOMEM) }
        defer { munmap(map, size) }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        var vector = [UInt8](repeating: 0, count: (size + page - 1) / page)
        guard mincore(map, size, &vector) == 0 else { throw POSIXError(.EINVAL) }
        return Double(vector.filter { $0 & 1 != 0 }.count) / Double(vector.count)
    }

    @Test func receivedLayersGoToTheDiskPastThePageCache() throws {
        let s = try BackupScenario(size: "48M", seed: 9)
        try s.dirty(writes: 240, maxOffset: 44 << 20)
        try s.backup(["--compress", "none"])
        let dest = s.dir.file("replica")
        let r = try QBackupBinary.run(["replicate", s.repo, dest, "--quiet", "--no-progress"])
        #expect(r.status == 0, "\(r.stderr)")
        let layers = try FileManager.default.contentsOfDirectory(atPath: dest).filter { $0.hasSuffix(".qcow2") }
        #expect(layers.count == 1)
        for name in layers {
            let size = try ReplicationTests.fileSize("\(dest)/\(name)")
            #expect(size > 8 << 20, "\(name) holds \(size) bytes")
            // Buffered writes leave every page cached after the fsync; direct ones only the
            // header and tables the receiver reads back to check the file.
            let cached = try Self.cachedFraction("\(dest)/\(name)")
            #expect(cached < 0.2, "\(Int(cached * 100))% of \(name) is in the page cache")
        }
        #expect(try ReplicationTests.layerFiles(dest) == ReplicationTests.layerFiles(s.repo))
    }

    @Test func framesCarryNoContentChecksumAndFramesWithOneStillDecode() throws {
        let input = Self.pattern(1 << 20, seed: 10).enumerated().map { $0.offset % 4096 < 2048 ? 0 : $0.element }
        var frame = [UInt8](repeating: 0, count: LZ4Frames.bound(input.count))
        let n = try #require(input.withUnsafeBytes { i in frame.withUnsafeMutableBytes { LZ4Frames.compress(i, into: $0) } })
        // The frame descriptor's FLG byte (after the 4-byte magic): bit 2 is the content checksum.
        #expect(frame[4] & 0x04 == 0, "FLG \(String(frame[4], radix: 2))")
        #expect(frame[4] & 0x08 != 0, "no content size in FLG \(String(frame[4], radix: 2))")
        var back = [UInt8](repeating: 0, count: input.count)
        #expect(frame.withUnsafeBytes { f in back.withUnsafeMutableBytes { LZ4Frames.decompress(UnsafeRawBufferPointer(rebasing: f[0..<n]), into: $0) } })
        #expect(back == input)

        // An earlier qbackup's frame, with the checksum: decodes, and a wrong checksum is refused.
        var prefs = LZ4F_preferences_t()
        prefs.frameInfo.blockSizeID = LZ4F_max4MB
        prefs.frameInfo.blockMode = LZ4F_blockIndependent
        prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled
        prefs.frameInfo.contentSize = UInt64(input.count)
        var old = [UInt8](repeating: 0, count: Int(LZ4F_compressFrameBound(input.count, &prefs)))
        let m = input.withUnsafeBytes { i in old.withUnsafeMutableBytes { LZ4F_compressFrame($0.baseAddress, $0.count, i.baseAddress, i.count, &prefs) } }
        #expect(LZ4F_isError(m) == 0)
        back = [UInt8](repeating: 0, count: input.count)
        #expect(old.withUnsafeBytes { f in back.withUnsafeMutableBytes { LZ4Frames.decompress(UnsafeRawBufferPointer(rebasing: f[0..<m]), into: $0) } })
        #expect(back == input)
        old[m - 1] ^= 0x40  // the last byte is the content checksum's
        #expect(!old.withUnsafeBytes { f in back.withUnsafeMutableBytes { LZ4Frames.decompress(UnsafeRawBufferPointer(rebasing: f[0..<m]), into: $0) } })
    }
}
