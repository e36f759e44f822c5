import Foundation
import Testing
import TestSupport

/// The interop matrix of the foundation issue: for images QEMU makes, our
/// `info` JSON equals qemu-img's on the keys both have, our `map` equals
/// qemu-img's once adjacent equal extents are merged, `flatten --format raw`
/// is byte-identical to `qemu-img convert -O raw`, and `compare` agrees.
@Suite struct InteropMatrixTests {
    struct Case: CustomTestStringConvertible, Sendable {
        var name: String
        /// Builds the image in `dir` and returns the path of the top image.
        var build: @Sendable (TempDir) throws -> String
        var testDescription: String { name }
    }

    static func plain(_ name: String, _ options: String, size: String = "8M", commands: [String]) -> Case {
        Case(name: name) { dir in
            let path = dir.file("img.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", options, path, size)
            if !commands.isEmpty { try Tools.qemuIO(path, format: "qcow2", commands) }
            return path
        }
    }

    static let writes = ["write -P 0x11 0 100k", "write -P 0x22 777777 5000", "write -P 0x33 3M 1M",
                         "write -z 3200k 200k", "discard 3M 128k", "write -P 0x44 7M 4k"]
    static let v2Writes = ["write -P 0x11 0 100k", "write -P 0x22 777777 5000", "write -P 0x33 3M 1M",
                           "write -P 0x44 7M 4k"]

    static let cases: [Case] = {
        var all: [Case] = []
        for cluster in [512, 4096, 65536, 2_097_152] {
            all.append(plain("v3 cluster \(cluster)", "cluster_size=\(cluster)", commands: writes))
            all.append(plain("v2 cluster \(cluster)", "compat=0.10,cluster_size=\(cluster)", commands: v2Writes))
        }
        for cluster in [65536, 2_097_152] {
            all.append(plain("extended_l2 cluster \(cluster)", "cluster_size=\(cluster),extended_l2=on", commands: writes))
        }
        for bits in [1, 2, 4, 8, 32, 64] {
            all.append(plain("refcount_bits \(bits)", "refcount_bits=\(bits)", commands: writes))
        }
        all.append(plain("lazy refcounts", "lazy_refcounts=on", commands: writes))
        all.append(plain("empty 1T", "cluster_size=65536", size: "1T", commands: ["write -P 1 512G 64k"]))
        for type in ["zlib", "zstd"] {
            all.append(Case(name: "compressed \(type)") { dir in
                let source = dir.file("src.qcow2")
                try Tools.qemuImg("create", "-q", "-f", "qcow2", source, "8M")
                try Tools.qemuIO(source, format: "qcow2", ["write -P 0x5a 0 1M", "write -P 0x6b 2M 300k", "write -z 4M 1M"])
                let out = dir.file("img.qcow2")
                try Tools.qemuImg("convert", "-c", "-O", "qcow2", "-o", "compression_type=\(type)", source, out)
                try Tools.qemuIO(out, format: "qcow2", ["write -P 0x7c 64k 4k"])
                return out
            })
        }
        all.append(Case(name: "internal snapshots") { dir in
            let path = dir.file("img.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "8M")
            try Tools.qemuIO(path, format: "qcow2", ["write -P 1 0 2M"])
            try Tools.qemuImg("snapshot", "-c", "first", path)
            try Tools.qemuIO(path, format: "qcow2", ["write -P 2 1M 2M", "discard 0 64k"])
            try Tools.qemuImg("snapshot", "-c", "second", path)
            try Tools.qemuIO(path, format: "qcow2", ["write -P 3 5M 64k"])
            return path
        })
        all.append(Case(name: "qcow2 backing chain, shorter base") { dir in
            try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "4M")
            try Tools.qemuIO(dir.file("base.qcow2"), format: "qcow2", ["write -P 1 0 3M", "write -z 3M 64k"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("mid.qcow2"), "6M")
            try Tools.qemuIO(dir.file("mid.qcow2"), format: "qcow2", ["write -P 2 1M 100k", "discard 2M 64k"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", dir.file("top.qcow2"), "8M")
            try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2", ["write -P 3 5M 10k", "write -z 0 64k"])
            return dir.file("top.qcow2")
        })
        all.append(Case(name: "raw backing") { dir in
            try Tools.qemuImg("create", "-q", "-f", "raw", dir.file("base.raw"), "8M")
            try Tools.qemuIO(dir.file("base.raw"), format: "raw", ["write -P 9 1M 1M"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", dir.file("top.qcow2"), "8M")
            try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2", ["write -P 8 1536k 64k"])
            return dir.file("top.qcow2")
        })
        all.append(Case(name: "extended_l2 over backing") { dir in
            try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "8M")
            try Tools.qemuIO(dir.file("base.qcow2"), format: "qcow2", ["write -P 1 0 8M"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "base.qcow2", "-F", "qcow2",
                              dir.file("top.qcow2"), "8M")
            try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2", ["write -P 2 4096 2048", "write -z 20k 4k",
                                                                       "write -P 3 1M 100k"])
            return dir.file("top.qcow2")
        })
        all.append(Case(name: "bitmaps") { dir in
            let path = dir.file("img.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "8M")
            try Tools.qemuImg("bitmap", "--add", path, "nightly")
            try Tools.qemuImg("bitmap", "--add", "-g", "512", "--disable", path, "frozen")
            try Tools.qemuIO(path, format: "qcow2", ["write -P 1 100k 300k", "write -z 2M 64k"])
            return path
        })
        return all
    }()

    @Test(arguments: cases)
    func agreesWithQemu(_ testCase: Case) throws {
        let dir = TempDir()
        let image = try testCase.build(dir)

        // info: every key both have carries the same value, and the essential keys are there.
        let ourInfo = try QBackupBinary.run(["info", "--output", "json", "--backing-chain", image])
        #expect(ourInfo.status == 0, "\(ourInfo.stderr)")
        let qemuInfo = try Tools.qemuImg("info", "--output=json", "--backing-chain", image)
        let ours = try #require(try JSONHelpers.parse(ourInfo.stdout) as? [[String: Any]])
        let theirs = try #require(try JSONHelpers.parse(qemuInfo.stdout) as? [[String: Any]])
        #expect(ours.count == theirs.count)
        for (a, b) in zip(ours, theirs) {
            for key in ["virtual-size", "filename", "format", "format-specific", "dirty-flag"] where b[key] != nil {
                #expect(a[key] != nil, "missing \(key)")
            }
            for (key, value) in b where a[key] != nil {
                #expect(JSONHelpers.canonical(a[key]!) == JSONHelpers.canonical(value), "info key \(key)")
            }
        }

        // map: same extents after merging.
        let ourMap = try QBackupBinary.run(["map", "--output", "json", image])
        #expect(ourMap.status == 0, "\(ourMap.stderr)")
        let qemuMap = try Tools.qemuImg("map", "--output=json", image)
        let a = try JSONHelpers.mergedMap(ourMap.stdout).map(JSONHelpers.canonical)
        let b = try JSONHelpers.mergedMap(qemuMap.stdout).map(JSONHelpers.canonical)
        #expect(a == b)

        // flatten --format raw: byte-identical to qemu-img convert -O raw.
        let flat = try QBackupBinary.run(["flatten", image, dir.file("ours.raw"), "--format", "raw"])
        #expect(flat.status == 0, "\(flat.stderr)")
        try Tools.qemuImg("convert", "-O", "raw", image, dir.file("theirs.raw"))
        let size = try FileManager.default.attributesOfItem(atPath: dir.file("theirs.raw"))[.size] as? Int ?? 0
        if size <= 64 << 20 {
            #expect(try Data.contents(of: dir.file("ours.raw")) == Data.contents(of: dir.file("theirs.raw")))
        } else {
            // Too large to hold in memory: QEMU compares the sparse files for us.
            let result = try Tools.run("qemu-img", ["compare", "-f", "raw", "-F", "raw", dir.file("ours.raw"),
                                                    dir.file("theirs.raw")])
            #expect(result.status == 0, "\(result.stdout)")
        }

        // flatten --format qcow2 (plain and zstd-compressed): QEMU reads the same contents and checks it clean.
        for extra in [[], ["--compress", "zstd"]] {
            let out = dir.file("ours-\(extra.count).qcow2")
            let q = try QBackupBinary.run(["flatten", image, out] + extra)
            #expect(q.status == 0, "\(q.stderr)")
            #expect(try Tools.run("qemu-img", ["compare", out, dir.file("theirs.raw")]).status == 0, "flatten \(extra)")
            let check = try Tools.run("qemu-img", ["check", out])
            #expect(check.status == 0, "\(check.stdout)")
            try? FileManager.default.removeItem(atPath: out)
        }

        // compare: identical to the reference, different after one byte changes.
        let same = try QBackupBinary.run(["compare", image, dir.file("theirs.raw")])
        #expect(same.status == 0, "\(same.stdout)\(same.stderr)")
        #expect(same.stdout == "Images are identical.\n")
        let flipAt: UInt64 = 777_777 + 17
        let byte = try peek(dir.file("theirs.raw"), at: flipAt, count: 1)[0]
        try poke(dir.file("theirs.raw"), at: flipAt, [byte ^ 0xff])
        let differ = try QBackupBinary.run(["compare", image, dir.file("theirs.raw")])
        #expect(differ.status == 1)
        #expect(differ.stdout == "Content mismatch at offset \(flipAt)!\n")
    }
}
