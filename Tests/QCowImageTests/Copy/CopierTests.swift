import Foundation
import QCowImage
import Testing
import TestSupport

/// The copy engine on images QEMU made, checked with qemu-img.
@Suite struct CopierTests {
    /// A 16 MiB disk of data that compresses (a different pattern every 64 KiB, so the
    /// clusters are not all alike) with a zeroed range and a hole.
    func makeDisk(in dir: TempDir) throws -> String {
        let path = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "16M")
        var writes: [String] = []
        for i in 0..<200 where i % 50 != 49 { writes.append("write -P \(i + 1) \(i * 64)k 40k") }
        writes.append("write -z 4M 256k")
        try Tools.qemuIO(path, format: "qcow2", writes)
        return path
    }

    /// Compressed flatten compresses on every core: the pool's threads that compressed at
    /// least one cluster are counted (the old flatten compressed cluster by cluster on one).
    @Test(arguments: [CompressionType.zlib, .zstd])
    func compressedFlattenUsesEveryCore(_ codec: CompressionType) throws {
        let dir = TempDir()
        let disk = try makeDisk(in: dir)
        let source = try ImageOpener.open(disk)
        defer { source.close() }
        var options = FlattenOptions()
        options.compression = codec
        let out = dir.file("flat.qcow2")
        let result = try ImageFlattener.flatten(source, to: out, options: options)
        #expect(System.coreCount >= 1)
        #expect(result.compressionThreads == System.coreCount, "\(result.compressionThreads) of \(System.coreCount) cores")
        try Tools.qemuImg("compare", "-q", out, disk)
        try Tools.qemuImg("check", "-q", out)
        let info = try JSONHelpers.parse(Tools.qemuImg("info", "--output=json", out).stdout) as? [String: Any]
        let specific = (info?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        #expect(specific?["compression-type"] as? String == codec.name)
        let flat = try ImageOpener.open(out)
        defer { flat.close() }
        #expect(try flat.blockStatus(at: 0, maxLength: 64 << 10).compressed)
    }

    /// The zero policy decides what a cluster that reads as zeros becomes: a zero cluster
    /// (hide), nothing (skip) or zero bytes written as data (write).
    @Test func zeroPolicies() throws {
        let dir = TempDir()
        let disk = try makeDisk(in: dir)
        let source = try ImageOpener.open(disk)
        defer { source.close() }
        // 4 MiB .. 4 MiB + 256 KiB is zeroed: the plan covers it and the data around it.
        var plan = CopyPlan(size: source.virtualSize, grain: 65536)
        plan.add((4 << 20) - 65536..<(4 << 20) + (320 << 10))
        for (policy, expected) in [(ZeroPolicy.hide, BlockStatus.Kind.zero), (.skip, .unallocated), (.write, .data)] {
            let path = dir.file("out-\(policy).qcow2")
            let out = try QCowCreator.create(at: path, options: QCowCreateOptions(size: source.virtualSize))
            let result = try Copier.copy(plan, from: source, to: .image(out), options: CopyOptions(zeros: policy))
            try out.flush()
            out.close()
            #expect(result.zeroBytes == 256 << 10)
            #expect(result.dataBytes == 128 << 10)
            let copy = try ImageOpener.open(path)
            defer { copy.close() }
            #expect(try copy.blockStatus(at: 4 << 20, maxLength: 256 << 10).kind == expected, "\(policy)")
            #expect(try copy.blockStatus(at: (4 << 20) - 65536, maxLength: 65536).kind == .data)
            try Tools.qemuImg("check", "-q", path)
        }
    }
}
