import Foundation
import QCowImage
import Testing
import TestSupport

/// Reads images QEMU made and compares every byte with `qemu-img convert -O raw`.
@Suite struct ReaderInteropTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var name: String
        var createOptions: String
        var ioCommands: [String]
        var compress: Bool = false
        var testDescription: String { name }
    }

    static let variants: [Variant] = [
        Variant(name: "v3 64k", createOptions: "cluster_size=65536",
                ioCommands: ["write -P 0x11 0 100k", "write -z 1M 64k", "write -P 0x22 3000 7000", "discard 0 64k"]),
        Variant(name: "v2 4k", createOptions: "compat=0.10,cluster_size=4096",
                ioCommands: ["write -P 0x33 5000 20000", "write -P 0x44 2M 1M"]),
        Variant(name: "512", createOptions: "cluster_size=512",
                ioCommands: ["write -P 0x55 1000 9000", "write -z 4096 512"]),
        Variant(name: "2M", createOptions: "cluster_size=2097152",
                ioCommands: ["write -P 0x66 3M 100k", "write -z 5M 2M"]),
        Variant(name: "extended l2", createOptions: "cluster_size=65536,extended_l2=on",
                ioCommands: ["write -P 0x77 4096 4096", "write -z 8192 2048", "write -P 0x78 70000 3000"]),
        Variant(name: "refcount 1", createOptions: "refcount_bits=1", ioCommands: ["write -P 1 0 1M"]),
        Variant(name: "refcount 64", createOptions: "refcount_bits=64", ioCommands: ["write -P 1 0 1M"]),
        Variant(name: "zlib compressed", createOptions: "cluster_size=65536",
                ioCommands: ["write -P 0x12 0 1M", "write -P 0x13 2M 70k"], compress: true),
        Variant(name: "zstd compressed", createOptions: "cluster_size=65536,compression_type=zstd",
                ioCommands: ["write -P 0x12 0 1M", "write -P 0x13 2M 70k"], compress: true),
    ]

    @Test(arguments: variants)
    func readsLikeQemu(_ variant: Variant) throws {
        let dir = TempDir()
        let image = dir.file("a.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", variant.createOptions, image, "8M")
        try Tools.qemuIO(image, format: "qcow2", variant.ioCommands)
        var path = image
        if variant.compress {
            path = dir.file("c.qcow2")
            try Tools.qemuImg("convert", "-c", "-O", "qcow2", "-o", variant.createOptions, image, path)
        }
        try Tools.qemuImg("convert", "-O", "raw", path, dir.file("ref.raw"))
        let reference = try Data.contents(of: dir.file("ref.raw"))
        let opened = try ImageOpener.open(path)
        defer { opened.close() }
        #expect(opened.virtualSize == UInt64(reference.count))
        var ours = [UInt8](repeating: 0xee, count: reference.count)
        try ours.withUnsafeMutableBytes { try opened.read(into: $0, at: 0) }
        #expect(Data(ours) == reference)
    }

    @Test func readsThroughBackingChain() throws {
        let dir = TempDir()
        try Tools.qemuImg("create", "-q", "-f", "raw", dir.file("base.raw"), "4M")
        try Tools.qemuIO(dir.file("base.raw"), format: "raw", ["write -P 0xa1 0 2M"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir.file("mid.qcow2"), "6M")
        try Tools.qemuIO(dir.file("mid.qcow2"), format: "qcow2", ["write -P 0xb2 1M 1500k", "write -z 100k 64k"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", dir.file("top.qcow2"), "8M")
        try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2", ["write -P 0xc3 5M 10k", "discard 1M 64k"])
        try Tools.qemuImg("convert", "-O", "raw", dir.file("top.qcow2"), dir.file("ref.raw"))
        let reference = try Data.contents(of: dir.file("ref.raw"))
        let opened = try ImageOpener.open(dir.file("top.qcow2"))
        defer { opened.close() }
        #expect(opened.chain.count == 3)
        var ours = [UInt8](repeating: 0xee, count: reference.count)
        try ours.withUnsafeMutableBytes { try opened.read(into: $0, at: 0) }
        #expect(Data(ours) == reference)
    }
}
