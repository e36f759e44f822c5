import ArgumentParser
import BitmapStore
import FoundationEssentials
import Glibc
import QCowImage

/// `qbackup info IMAGE [--backing-chain]` — like `qemu-img info`.
struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show an image's format, sizes, backing file, snapshots and bitmaps (like qemu-img info).",
        discussion: "With --output json the keys are qemu-img's, so scripts written for qemu-img keep working.")

    @Argument(help: "The image file (qcow2 or raw).", completion: .file())
    var image: String

    @Option(name: [.customShort("f"), .customLong("image-format")], help: "Open the image as qcow2 or raw (default: probe).")
    var imageFormat: ImageOpener.Format?

    @Flag(name: .long, help: "Show every image of the backing chain, top first.")
    var backingChain = false

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions

    func run() throws {
        // One image's JSON is an object (with warnings, and an error object); the chain's an array as qemu-img's.
        try ExitStatus.run(json: options.json && !backingChain) {
            let opened = try ImageOpener.open(image, format: imageFormat, lock: share.lock)
            share.warn([image])
            defer { opened.close() }
            let layers = backingChain ? opened.chain : [opened]
            let infos = layers.map { ImageInfo($0) }
            // Bitmaps as qemu-img shows them; a broken bitmap directory hides only the bitmaps.
            let bitmaps: [[BitmapInfo]] = layers.map { layer in
                (layer as? QCowFile).flatMap { try? BitmapCatalog.info(for: $0) } ?? []
            }
            if options.json {
                let values = zip(infos, bitmaps).map { InfoCommand.json($0, bitmaps: $1) }
                if backingChain { emit(JSON.array(values).pretty() + "\n") } else { JSONReport.set(values[0]) }
            } else {
                emit(zip(infos, bitmaps).map { InfoCommand.human($0, bitmaps: $1) }.joined(separator: "\n"))
            }
            DamageWarnings.emit(for: [opened])
            return 0
        }
    }

    static func json(_ info: ImageInfo, bitmaps: [BitmapInfo]) -> JSON {
        var pairs: [(String, JSON)] = []
        if let format = info.backingFormat { pairs.append(("backing-filename-format", .string(format))) }
        if !info.snapshots.isEmpty { pairs.append(("snapshots", .array(info.snapshots.map(snapshotJSON)))) }
        pairs.append(("virtual-size", .uint(info.virtualSize)))
        pairs.append(("filename", .string(info.filename)))
        if let cluster = info.clusterSize { pairs.append(("cluster-size", .int(Int64(cluster)))) }
        pairs.append(("format", .string(info.format)))
        if let actual = info.actualSize { pairs.append(("actual-size", .uint(actual))) }
        if let q = info.qcow2 {
            var data: [(String, JSON)] = [("compat", .string(q.compat)), ("compression-type", .string(q.compressionType))]
            if let lazy = q.lazyRefcounts { data.append(("lazy-refcounts", .bool(lazy))) }
            if !bitmaps.isEmpty {
                data.append(("bitmaps", .array(bitmaps.map { b in
                    .object([("flags", .array(b.flags.map { .string($0) })), ("name", .string(b.name)),
                             ("granularity", .uint(b.granularity))])
                })))
            }
            data.append(("refcount-bits", .int(Int64(q.refcountBits))))
            if let corrupt = q.corrupt { data.append(("corrupt", .bool(corrupt))) }
            if let ext = q.extendedL2 { data.append(("extended-l2", .bool(ext))) }
            if let file = q.dataFile { data.append(("data-file", .string(file))) }
            if let raw = q.dataFileRaw { data.append(("data-file-raw", .bool(raw))) }
            pairs.append(("format-specific", .object([("type", .string("qcow2")), ("data", .object(data))])))
        }
        if let full = info.fullBackingFilename { pairs.append(("full-backing-filename", .string(full))) }
        if let backing = info.backingFilename { pairs.append(("backing-filename", .string(backing))) }
        pairs.append(("dirty-flag", .bool(info.dirtyFlag)))
        return .object(pairs)
    }

    static func snapshotJSON(_ s: Snapshot) -> JSON {
        var pairs: [(String, JSON)] = []
        if let icount = s.icount, icount != UInt64.max { pairs.append(("icount", .uint(icount))) }
        pairs.append(("vm-clock-nsec", .uint(s.vmClockNanoseconds % 1_000_000_000)))
        pairs.append(("name", .string(s.name)))
        pairs.append(("date-sec", .uint(UInt64(s.dateSeconds))))
        pairs.append(("date-nsec", .uint(UInt64(s.dateNanoseconds))))
        pairs.append(("vm-clock-sec", .uint(s.vmClockNanoseconds / 1_000_000_000)))
        pairs.append(("id", .string(s.id)))
        pairs.append(("vm-state-size", .uint(s.vmStateSizeLarge)))
        return .object(pairs)
    }

    static func human(_ info: ImageInfo, bitmaps: [BitmapInfo]) -> String {
        var lines = ["image: \(info.filename)", "file format: \(info.format)",
                     "virtual size: \(humanSize(info.virtualSize)) (\(info.virtualSize) bytes)"]
        if let actual = info.actualSize { lines.append("disk size: \(humanSize(actual))") }
        if let cluster = info.clusterSize { lines.append("cluster_size: \(cluster)") }
        if let backing = info.backingFilename {
            let full = info.fullBackingFilename.map { $0 == backing ? "" : " (actual path: \($0))" } ?? ""
            lines.append("backing file: \(backing)\(full)")
        }
        if let format = info.backingFormat { lines.append("backing file format: \(format)") }
        if !info.snapshots.isEmpty {
            lines.append("Snapshot list:")
            lines.append("ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT")
            for s in info.snapshots {
                let clock = s.vmClockNanoseconds
                let vmClock = String(printf: "%02llu:%02llu:%02llu.%03llu", clock / 3_600_000_000_000,
                                     clock / 60_000_000_000 % 60, clock / 1_000_000_000 % 60, clock / 1_000_000 % 1000)
                let icount = s.icount.map { $0 == UInt64.max ? "" : String($0) } ?? ""
                lines.append(s.id.padding(10) + s.name.padding(18) + humanSize(s.vmStateSizeLarge).leftPadded(7)
                             + " " + localDate(s.dateSeconds) + " " + vmClock + icount.leftPadded(11))
            }
        }
        if let q = info.qcow2 {
            lines.append("Format specific information:")
            lines.append("    compat: \(q.compat)")
            lines.append("    compression type: \(q.compressionType)")
            if let lazy = q.lazyRefcounts { lines.append("    lazy refcounts: \(lazy)") }
            if !bitmaps.isEmpty {
                lines.append("    bitmaps:")
                for (i, b) in bitmaps.enumerated() {
                    lines.append("        [\(i)]:")
                    lines.append("            flags:")
                    for (j, f) in b.flags.enumerated() { lines.append("                [\(j)]: \(f)") }
                    lines.append("            name: \(b.name)")
                    lines.append("            granularity: \(b.granularity)")
                }
            }
            lines.append("    refcount bits: \(q.refcountBits)")
            if let corrupt = q.corrupt { lines.append("    corrupt: \(corrupt)") }
            if let ext = q.extendedL2 { lines.append("    extended l2: \(ext)") }
            if let file = q.dataFile { lines.append("    data file: \(file)") }
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

extension String {
    func padding(_ width: Int) -> String {
        count >= width ? self + " " : self + String(repeating: " ", count: width - count)
    }
}

extension String {
    func leftPadded(_ width: Int) -> String {
        count >= width ? self : String(repeating: " ", count: width - count) + self
    }
}

/// "2026-11-25 09:34:06" in local time, as qemu-img prints snapshot dates.
func localDate(_ seconds: UInt32) -> String {
    CivilTime(seconds: time_t(seconds), localTime: true).text("%Y-%m-%d %H:%M:%S")
}

extension ImageOpener.Format: ExpressibleByArgument {}
