import Foundation
import QCowImage
import Testing
import TestSupport

/// `ImageFlattener` to qcow2 against `qemu-img convert` on a chain QEMU made.
@Suite struct FlattenTests {
    struct Variant: CustomTestStringConvertible, Sendable {
        var name: String
        var options: FlattenOptions
        var testDescription: String { name }
    }

    static let variants: [Variant] = {
        var plain = FlattenOptions()
        var zlib = FlattenOptions()
        zlib.compression = .zlib
        var zstd = FlattenOptions()
        zstd.compression = .zstd
        zstd.extendedL2 = true
        var small = FlattenOptions()
        small.clusterSize = 4096
        small.refcountBits = 1
        var raw = FlattenOptions()
        raw.format = .raw
        return [Variant(name: "plain", options: plain), Variant(name: "zlib", options: zlib),
                Variant(name: "zstd extended L2", options: zstd), Variant(name: "4k rc1", options: small),
                Variant(name: "raw", options: raw)]
    }()

    func makeChain(in dir: TempDir) throws {
        try Tools.qemuImg("create", "-q", "-f", "raw", dir.file("base.raw"), "4M")
        try Tools.qemuIO(dir.file("base.raw"), format: "raw", ["write -P 0xa1 0 2M"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir.file("mid.qcow2"), "6M")
        try Tools.qemuIO(dir.file("mid.qcow2"), format: "qcow2", ["write -P 0xb2 1M 1500k", "write -z 128k 64k"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=32768,extended_l2=on", "-b", "mid.qcow2",
                          "-F", "qcow2", dir.file("top.qcow2"), "8M")
        try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2",
                         ["write -P 0xc3 5M 10k", "discard 1M 64k", "write -z 3M 256k", "write -P 0xc4 7M 3333"])
    }

    @Test(arguments: variants)
    func matchesQemuConvert(_ v: Variant) throws {
        let dir = TempDir()
        try makeChain(in: dir)
        let source = try ImageOpener.open(dir.file("top.qcow2"))
        let out = dir.file("flat.\(v.options.format.rawValue)")
        let result = try ImageFlattener.flatten(source, to: out, options: v.options)
        source.close()
        #expect(result.dataBytes > 0)
        try Tools.qemuImg("convert", "-O", "qcow2", dir.file("top.qcow2"), dir.file("qemu.qcow2"))
        try Tools.qemu("qemu-img", ["compare", "-q", "-f", v.options.format.rawValue, "-F", "qcow2", out, dir.file("qemu.qcow2")])
        try Tools.qemu("qemu-img", ["compare", "-q", "-f", v.options.format.rawValue, out, dir.file("top.qcow2")])
        guard v.options.format == .qcow2 else { return }
        try Tools.qemuImg("check", "-f", "qcow2", out)
        let info = try JSONSerialization.jsonObject(with: Tools.qemuImg("info", "--output=json", out).stdoutData) as? [String: Any]
        #expect(info?["backing-filename"] == nil)
        let flat = try ImageOpener.open(out)
        defer { flat.close() }
        // Nothing is allocated where the chain had nothing (past the raw base's 4 MiB, outside the writes).
        let status = try flat.blockStatus(at: 6 << 20, maxLength: 64 << 10)
        #expect(status.kind == .unallocated)
        // Laid out as qemu-img convert lays the chain out: data where data is, and zero
        // extents, clusters that read as zeros and holes left unallocated.
        let zero = try flat.blockStatus(at: 3 << 20, maxLength: 64 << 10)
        #expect(zero.kind == .unallocated)
        if !v.options.extendedL2 {
            var convert = ["convert", "-O", "qcow2", "-o", "cluster_size=\(v.options.clusterSize),refcount_bits=\(v.options.refcountBits)"]
            if let codec = v.options.compression { convert += ["-c", "-o", "compression_type=\(codec.name)"] }
            try Tools.qemu("qemu-img", convert + [dir.file("top.qcow2"), dir.file("same.qcow2")])
            #expect(try JSONHelpers.allocation(of: out) == JSONHelpers.allocation(of: dir.file("same.qcow2")))
        }
        if v.options.compression != nil {
            let data = try flat.blockStatus(at: 0, maxLength: 64 << 10)
            #expect(data.compressed)
        }
    }
}
