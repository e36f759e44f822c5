import ArgumentParser
import QCowImage

/// `qbackup map IMAGE` — the allocation map, like `qemu-img map`.
struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Show where the image's data lives (like qemu-img map).",
        discussion: """
            With --output json, one extent per line: start, length, depth in the backing chain, \
            present (allocated at some layer), zero, data, and the host offset when known.
            """)

    @Argument(help: "The image file (qcow2 or raw).", completion: .file())
    var image: String

    @Option(name: [.customShort("f"), .customLong("image-format")], help: "Open the image as qcow2 or raw (default: probe).")
    var imageFormat: ImageOpener.Format?

    @OptionGroup var options: GlobalOptions
    @OptionGroup var share: ShareOptions

    func run() throws {
        try ExitStatus.run {
            let opened = try ImageOpener.open(image, format: imageFormat, lock: share.lock)
            share.warn([image])
            defer { opened.close() }
            if options.json {
                var first = true
                try opened.forEachMapExtent { ext in
                    emit((first ? "[" : ",\n") + MapCommand.json(ext).compact)
                    first = false
                }
                emit(first ? "[]\n" : "]\n")
            } else {
                emit("Offset          Length          Mapped to       File\n")
                try opened.forEachMapExtent { ext in
                    guard ext.data, let offset = ext.offset else { return }
                    emit(hex(ext.start).padding(16) + hex(ext.length).padding(16) + hex(offset).padding(16)
                         + (ext.filename ?? "") + "\n")
                }
            }
            DamageWarnings.emit(for: [opened])
            return 0
        }
    }

    static func json(_ e: MapExtent) -> JSON {
        var pairs: [(String, JSON)] = [
            ("start", .uint(e.start)), ("length", .uint(e.length)), ("depth", .int(Int64(e.depth))),
            ("present", .bool(e.present)), ("zero", .bool(e.zero)), ("data", .bool(e.data)),
        ]
        if let offset = e.offset { pairs.append(("offset", .uint(offset))) }
        return .object(pairs)
    }
}
